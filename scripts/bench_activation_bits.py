"""Where int8 activations cost perplexity once the weights are exact: the int4 kernel twin's activation widths.

    python scripts/bench_activation_bits.py --fp32 .cache/models/smollm2-135m-instruct-fp32 \
        --int4 .cache/models/smollm2-135m-instruct-int4 --out benchmarks/activation_bits.json

The fp32 export of the default model holds the shipped Q4_1 GGUF's weights exactly (its 4-bit layers) and its
Q8_0 embedding, so rounding the inputs of chosen MatMuls to int8 per 32-block (|max| / 127 steps, as edgellm's
int8 kernels and llama.cpp's Q8_1 do) inside that graph shows what each matrix type's int8 activations cost, with
nothing else changed. The int4 folder's kernel twin (16-bit activations for its 4-bit matrices and lm_head) is
scored on the same tokens. Scored like the convert gate: edgellm/data/heldout_en.txt, the gate's token count and
windows, teacher-forced.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from tokenizers import Tokenizer

from edgellm.convert.graph import save_model
from edgellm.manifest import read_manifest
from edgellm.record import Recorder, Table
from edgellm.runtime import measure
from edgellm.runtime.session import DecoderSession

HELDOUT = Path(__file__).resolve().parent.parent / "edgellm" / "data" / "heldout_en.txt"
LAYERS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
VARIANTS = {"none (fp32)": (), "lm_head": ("lm_head",), "down_proj": ("down_proj",),
            "qkv_proj + gate_up_proj": ("qkv_proj", "gate_up_proj"), "4 layer projections": LAYERS,
            "4 layer projections + lm_head": LAYERS + ("lm_head",)}


def round_inputs_to_int8(model: onnx.ModelProto, which: tuple[str, ...]) -> onnx.ModelProto:
    """A copy whose MatMuls named like `which` read their input rounded to int8 per 32-block."""
    model = copy.deepcopy(model)
    g = model.graph
    g.initializer.extend([numpy_helper.from_array(np.array([0, 0, -1, 32], np.int64), "fq/blocks"),
                          numpy_helper.from_array(np.array([-1], np.int64), "fq/last"),
                          numpy_helper.from_array(np.array(127.0, np.float32), "fq/127"),
                          numpy_helper.from_array(np.array(1e-30, np.float32), "fq/tiny")])
    nodes = []
    for n in g.node:
        if n.op_type == "MatMul" and any(n.name.endswith(w) for w in which):
            x, p = n.input[0], n.name + "/fq"
            nodes += [helper.make_node("Shape", [x], [p + "/shape"]),
                      helper.make_node("Reshape", [x, "fq/blocks"], [p + "/blocks"]),
                      helper.make_node("Abs", [p + "/blocks"], [p + "/abs"]),
                      helper.make_node("ReduceMax", [p + "/abs", "fq/last"], [p + "/max"], keepdims=1),
                      helper.make_node("Div", [p + "/max", "fq/127"], [p + "/step0"]),
                      helper.make_node("Max", [p + "/step0", "fq/tiny"], [p + "/step"]),
                      helper.make_node("Div", [p + "/blocks", p + "/step"], [p + "/scaled"]),
                      helper.make_node("Round", [p + "/scaled"], [p + "/q"]),
                      helper.make_node("Mul", [p + "/q", p + "/step"], [p + "/dq"]),
                      helper.make_node("Reshape", [p + "/dq", p + "/shape"], [p + "/out"])]
            n.input[0] = p + "/out"
        nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", required=True, help="`edgellm convert --precision fp32` folder of the default model")
    parser.add_argument("--int4", required=True, help="`edgellm convert --precision int4` folder (with its twin)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/activation_bits.json")
    args = parser.parse_args()
    recorder = Recorder("bench_activation_bits", parameters=vars(args))
    fp32, int4 = Path(args.fp32), Path(args.int4)
    m = read_manifest(int4)
    gate = m.validation.gate.settings
    tokens = Tokenizer.from_file(str(int4 / "tokenizer.json")).encode(
        HELDOUT.read_text(encoding="utf-8"), add_special_tokens=False).ids[:gate["heldout_tokens"] + 1]
    window, capacity = gate["window"], gate["window"] + 64
    common = dict(io=m.io, dims=m.dims, capacity=capacity, threads=args.threads, graph=m.graph)
    base = onnx.load(str(fp32 / "model.onnx"))
    scores = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, which in VARIANTS.items():
            path = Path(tmp) / f"{len(scores)}" / "model.onnx"
            path.parent.mkdir()
            save_model(round_inputs_to_int8(base, which), str(path))
            scores[name] = measure.perplexity(DecoderSession(path, kernels=False, **common), tokens, window)
            print(f"int8 inputs on {name}: {scores[name].perplexity:.3f}", flush=True)
    twin = DecoderSession(int4 / m.files["model"], kernel_path=int4 / m.files["kernel_model"], kernels=True,
                          **common)
    scores["int4 kernel twin (16-bit activations)"] = measure.perplexity(twin, tokens, window)
    scores["int4 model.onnx (onnxruntime, int8 activations)"] = measure.perplexity(
        DecoderSession(int4 / m.files["model"], kernels=False, **common), tokens, window)
    reference = scores["none (fp32)"]
    summary, rows = {}, []
    for name, score in scores.items():
        summary[name] = {"perplexity": round(score.perplexity, 4),
                         "perplexity_vs_fp32": round(score.perplexity / reference.perplexity, 5),
                         "greedy_agreement": round(float((score.argmax == reference.argmax).mean()), 4)}
        rows.append([name, f"{score.perplexity:.3f}", f"{summary[name]['perplexity_vs_fp32']:.4f}",
                     f"{summary[name]['greedy_agreement']:.3f}"])
    table = Table(["int8 activations on", "held-out perplexity", "× fp32", "greedy agreement vs fp32"], rows)
    recorder.write(args.out, samples={k: v.perplexity for k, v in scores.items()}, summary=summary, table=table,
                   notes=f"{m.name}: {len(tokens) - 1} held-out tokens in windows of {window}, {args.threads} threads")
    print(table.markdown())


if __name__ == "__main__":
    main()
