"""Does a cheaper lm_head pay? Held-out perplexity, greedy agreement and decode speed per head variant, one run.

    python scripts/bench_head_bits.py --fp32 .cache/models/smollm2-135m-instruct-fp32 \
        --int8 .cache/models/smollm2-135m-instruct --out benchmarks/head_bits.json

The tied 49152 x 576 lm_head is the one weight besides the layers read in full for every token (the embedding reads
one row). Each variant takes the shipped int8 graph (SmoothQuant, MatMulNBits 8-bit blocks of 32) and refits only
its lm_head from the fp32 export's weight with edgellm.convert.quantize.quantize_lm_head (4-bit, the block size and
fit named); the embedding keeps reading the int8 table. "+ int8 top-k" adds rescore_lm_head_top_k: the k largest
4-bit logits of each position are recomputed from the int8 rows, the next k blended from int8 down to 4-bit. Scored like the convert gate (edgellm/data/
heldout_en.txt, 2048 tokens, windows of 512, teacher-forced, against fp32); decode timed with the decode probe at
1 and 2 threads, every variant once per round in a rotating order, loadavg noted per round. On a loaded 2-core
machine those whole-step ratios move by +-10%, so the head is also timed alone (`head_only`): the same head graphs
(embedding Gather + lm_head + rescoring) on one hidden state from the held-out text, 100 runs per sample, interleaved.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
from pathlib import Path

import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from tokenizers import Tokenizer

from edgellm.convert.graph import save_model
from edgellm.convert.quantize import lm_head_weight, quantize_int8, quantize_lm_head, rescore_lm_head_top_k
from edgellm.manifest import read_manifest
from edgellm.record import Recorder, Table
from edgellm.runtime import measure
from edgellm.runtime.session import DecoderSession

HELDOUT = Path(__file__).resolve().parent.parent / "edgellm" / "data" / "heldout_en.txt"
BASE = "int8 (shipped default)"
# name -> (block size, fit, rescored top-k or 0, accuracy_level); None: the shipped graph unchanged
VARIANTS: dict[str, tuple[int, str, int, int] | None] = {
    BASE: None,
    "head 4-bit b32 rtn": (32, "rtn", 0, 4),
    "head 4-bit b32 k_quant": (32, "k_quant", 0, 4),
    "head 4-bit b64 k_quant": (64, "k_quant", 0, 4),
    "head 4-bit b128 k_quant": (128, "k_quant", 0, 4),
    "head 4-bit b32 rtn + int8 top-32": (32, "rtn", 32, 4),
    "head 4-bit b32 rtn + int8 top-128 (--head-bits 4)": (32, "rtn", 128, 4),
    "head 4-bit b32 rtn + int8 top-256": (32, "rtn", 256, 4),
    "head 4-bit b32 rtn_sym + int8 top-128": (32, "rtn_sym", 128, 4),
    "head 4-bit b64 rtn + int8 top-128": (64, "rtn", 128, 4),
    "head 4-bit b64 rtn + int8 top-256": (64, "rtn", 256, 4),
    "head 4-bit b128 rtn + int8 top-128": (128, "rtn", 128, 4),
}


def head_graph(weight: np.ndarray, spec: tuple[int, str, int, int] | None) -> onnx.ModelProto:
    """ids -> embedding, hidden -> logits: the tied head alone, quantized like the variant `spec`."""
    k, v = weight.shape
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["x", "head"], ["lm_head/out0"], name="lm_head")]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, 1]),
                                              helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, k])],
                              [helper.make_tensor_value_info("emb", onnx.TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("lm_head/out0", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(np.ascontiguousarray(weight.T), "table"),
                               numpy_helper.from_array(weight, "head")])
    model = quantize_int8(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tied=True)
    if spec is not None:
        block, method, top_k, level = spec
        quantize_lm_head(model, weight, 4, block, method, accuracy_level=level)
        if top_k:
            rescore_lm_head_top_k(model, top_k)
    return model


def head_input(shipped: onnx.ModelProto, folder: Path, prompt: list[int]) -> np.ndarray:
    """The shipped graph's lm_head input (K,) after `prompt`: the graph with its head swapped for an Identity."""
    model = copy.deepcopy(shipped)
    head = next(n for n in model.graph.node if n.output and n.output[0] == "lm_head/out0")
    index = list(model.graph.node).index(head)
    model.graph.node.remove(head)
    model.graph.node.insert(index, helper.make_node("Identity", [head.input[0]], ["lm_head/out0"], name="head_input"))
    m = read_manifest(folder)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, str(Path(tmp) / "model.onnx"))
        session = DecoderSession(Path(tmp) / "model.onnx", m.io, m.dims, 640, threads=1, graph=m.graph)
        return np.array(session.forward(prompt, keep=2)[-1])  # keep > 1: an output of the graph's own shape


def time_heads(weight: np.ndarray, variants: dict, hidden: np.ndarray, threads: list[int], rounds: int) -> dict:
    """ms per head call, `rounds` samples of 100 calls per variant and thread count, variants interleaved."""
    feeds = {"ids": np.array([[5]], dtype=np.int64), "x": hidden.reshape(1, 1, -1).astype(np.float32)}
    sessions = {}
    for name, spec in variants.items():
        blob = head_graph(weight, spec).SerializeToString()
        for t in threads:
            options = ort.SessionOptions()
            options.intra_op_num_threads = t
            sessions[(name, t)] = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
            for _ in range(20):
                sessions[(name, t)].run(None, feeds)
    samples: dict[str, dict[str, list[float]]] = {f"{t}t": {name: [] for name in variants} for t in threads}
    keys = list(sessions)
    for r in range(rounds):
        for name, t in keys[r % len(keys):] + keys[:r % len(keys)]:
            start = time.perf_counter()
            for _ in range(100):
                sessions[(name, t)].run(None, feeds)
            samples[f"{t}t"][name].append((time.perf_counter() - start) * 10)  # ms per call
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", required=True)
    parser.add_argument("--int8", required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved decode-probe rounds")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per probe")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--head-rounds", type=int, default=15, help="interleaved rounds of the head-only timing")
    parser.add_argument("--out", default="benchmarks/head_bits.json")
    args = parser.parse_args()
    recorder = Recorder("bench_head_bits", parameters=vars(args))
    fp32, int8 = Path(args.fp32), Path(args.int8)
    m32, m8 = read_manifest(fp32), read_manifest(int8)
    tokens = Tokenizer.from_file(str(fp32 / "tokenizer.json")).encode(
        HELDOUT.read_text(encoding="utf-8"), add_special_tokens=False).ids[:2049]
    variants = {k: v for k, v in VARIANTS.items() if not args.only or k in args.only or k == BASE}

    reference = measure.perplexity(DecoderSession(fp32 / "model.onnx", m32.io, m32.dims, 640, threads=2), tokens, 512)
    weight = lm_head_weight(onnx.load(str(fp32 / "model.onnx")))
    shipped = onnx.load(str(int8 / "model.onnx"))
    scores, sessions, sizes, kv = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, spec) in enumerate(variants.items()):
            path = int8 / "model.onnx"
            if spec is not None:
                block, method, top_k, level = spec
                model = quantize_lm_head(copy.deepcopy(shipped), weight, 4, block, method, accuracy_level=level)
                if top_k:
                    rescore_lm_head_top_k(model, top_k)
                path = Path(tmp) / str(index) / "model.onnx"
                path.parent.mkdir()
                save_model(model, str(path))
                del model
            sizes[name] = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith("model.onnx"))
            sessions[name] = {t: DecoderSession(path, m8.io, m8.dims, 640, threads=t, graph=m8.graph)
                              for t in args.threads}
            scores[name] = measure.perplexity(sessions[name][2 if 2 in args.threads else args.threads[0]], tokens, 512)
            kv[name] = measure.kv_consistency(sessions[name][args.threads[-1]], tokens[:48])  # the gate's check
            print(f"{name}: ppl {scores[name].perplexity:.3f} x{scores[name].perplexity / reference.perplexity:.4f} "
                  f"agree {float((scores[name].argmax == reference.argmax).mean()):.4f}", flush=True)
        prompt = tokens[:40]
        speed: dict[str, dict[str, list[float]]] = {f"{t}t": {name: [] for name in sessions} for t in args.threads}
        load: list[list[float]] = []
        names = list(sessions)
        for r in range(args.rounds):
            load.append([round(x, 2) for x in os.getloadavg()])
            for name in names[r % len(names):] + names[:r % len(names)]:
                for t in args.threads:
                    speed[f"{t}t"][name].append(
                        measure.decode_probe(sessions[name][t], prompt, args.steps).decode_ms_per_token)
            print(f"round {r + 1}/{args.rounds} load {load[-1]}", flush=True)
    head_samples = {}
    if args.head_rounds:
        hidden = head_input(shipped, int8, tokens[:100])
        head_samples = time_heads(weight, variants, hidden, args.threads, args.head_rounds)
    summary, rows = {}, []
    for name, score in scores.items():
        heads = {f"head_only_ms_{t}t_min": round(min(head_samples[f"{t}t"][name]), 3)
                 for t in args.threads if head_samples}
        entry = {"perplexity": round(score.perplexity, 3),
                 "perplexity_vs_fp32": round(score.perplexity / reference.perplexity, 4),
                 "greedy_agreement": round(float((score.argmax == reference.argmax).mean()), 4),
                 "model_bytes": sizes[name],
                 "kv_max_abs_diff_stepwise": round(kv[name].max_abs_diff_stepwise, 3),  # the gate's limit: 2.5
                 **heads}
        row = [name, entry["perplexity"], entry["perplexity_vs_fp32"], entry["greedy_agreement"],
               entry["kv_max_abs_diff_stepwise"]]
        for t in args.threads if args.rounds else ():
            times = speed[f"{t}t"]
            ratio = statistics.median(a / b for a, b in zip(times[name], times[BASE]))
            entry[f"decode_ms_{t}t_median"] = round(statistics.median(times[name]), 3)
            entry[f"decode_vs_int8_{t}t_median"] = round(ratio, 3)
            # the fastest round of each: what the variant costs when the other helpers' load lets it run
            entry[f"decode_ms_{t}t_min"] = round(min(times[name]), 3)
            entry[f"decode_vs_int8_{t}t_min"] = round(min(times[name]) / min(times[BASE]), 3)
            row += [entry[f"decode_ms_{t}t_median"], round(ratio, 3), entry[f"decode_vs_int8_{t}t_min"]]
        row += list(heads.values())
        summary[name] = entry
        rows.append(row)
    summary["fp32_perplexity"] = round(reference.perplexity, 3)
    summary["loadavg_per_round"] = load
    header = ["lm_head", "held-out perplexity", "× fp32", "greedy agreement", "stepwise vs one-pass max |Δ|"]
    for t in args.threads if args.rounds else ():
        header += [f"decode ms/token {t}t", f"× int8 {t}t (median)", f"× int8 {t}t (fastest rounds)"]
    header += [f"head alone ms {t}t (fastest)" for t in args.threads if head_samples]
    table = Table(header, rows)
    recorder.write(args.out, samples={"decode_ms": speed, "head_only_ms": head_samples}, summary=summary, table=table,
                   notes=f"{m8.name}, 2048 held-out tokens in windows of 512; decode probe {args.steps} steps after a "
                         f"40-token prompt; ratios are medians of per-round ratios to the shipped int8 graph")
    print(table.markdown())


if __name__ == "__main__":
    main()
