"""Does a cheaper lm_head pay? Held-out perplexity, greedy agreement and decode speed per head variant, one run.

    python scripts/bench_head_bits.py --fp32 .cache/models/smollm2-135m-instruct-fp32 \
        --int8 .cache/models/smollm2-135m-instruct --out benchmarks/head_bits.json

The tied 49152 x 576 lm_head is the one weight besides the layers read in full for every token (the embedding reads
one row). Each variant takes the shipped int8 graph (SmoothQuant, MatMulNBits 8-bit blocks of 32) and refits only
its lm_head from the fp32 export's weight with edgellm.convert.quantize.quantize_lm_head (4-bit, the block size and
fit named); the embedding keeps reading the int8 table. "+ int8 top-k" adds rescore_lm_head_top_k: the k largest
4-bit logits of each position are recomputed from the int8 rows, the next k blended from int8 down to 4-bit. Scored like the convert gate (edgellm/data/
heldout_en.txt, 2048 tokens, windows of 512, teacher-forced, against fp32); decode timed with the decode probe at
1 and 2 threads, every variant once per round in a rotating order, loadavg noted per round.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
from pathlib import Path

import onnx
from tokenizers import Tokenizer

from edgellm.convert.graph import save_model
from edgellm.convert.quantize import lm_head_weight, quantize_lm_head, rescore_lm_head_top_k
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
    "head 4-bit b128 rtn + int8 top-128": (128, "rtn", 128, 4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", required=True)
    parser.add_argument("--int8", required=True)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved decode-probe rounds")
    parser.add_argument("--steps", type=int, default=48, help="decode steps per probe")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
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
    summary, rows = {}, []
    for name, score in scores.items():
        entry = {"perplexity": round(score.perplexity, 3),
                 "perplexity_vs_fp32": round(score.perplexity / reference.perplexity, 4),
                 "greedy_agreement": round(float((score.argmax == reference.argmax).mean()), 4),
                 "model_bytes": sizes[name],
                 "kv_max_abs_diff_stepwise": round(kv[name].max_abs_diff_stepwise, 3)}  # the gate's limit: 2.5
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
        summary[name] = entry
        rows.append(row)
    summary["fp32_perplexity"] = round(reference.perplexity, 3)
    summary["loadavg_per_round"] = load
    header = ["lm_head", "held-out perplexity", "× fp32", "greedy agreement", "stepwise vs one-pass max |Δ|"]
    for t in args.threads if args.rounds else ():
        header += [f"decode ms/token {t}t", f"× int8 {t}t (median)", f"× int8 {t}t (fastest rounds)"]
    table = Table(header, rows)
    recorder.write(args.out, samples=speed, summary=summary, table=table,
                   notes=f"{m8.name}, 2048 held-out tokens in windows of 512; decode probe {args.steps} steps after a "
                         f"40-token prompt; ratios are medians of per-round ratios to the shipped int8 graph")
    print(table.markdown())


if __name__ == "__main__":
    main()
