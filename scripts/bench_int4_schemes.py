"""Which layers to keep at 8 bits in an int4 model: held-out perplexity and decode speed per mix, one run.

    python scripts/bench_int4_schemes.py --fp32 .cache/models/smollm2-135m-instruct-fp32 \
        --int8 .cache/models/smollm2-135m-instruct --out benchmarks/int4_schemes.json

Each scheme quantizes the fp32 export (the folder of `edgellm convert --precision fp32`) with
edgellm.convert.quantize.quantize_int4 (4-bit round-to-nearest blocks, uint4 zero points), keeping
`edge` first/last blocks and the listed projections at 8 bits. Scored like the convert gate
(edgellm/data/heldout_en.txt, 2048 tokens, windows of 512, teacher-forced, against fp32), and timed
with the decode probe against the shipped int8 folder, interleaved in this process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import onnx
from tokenizers import Tokenizer

from edgellm.convert.graph import save_model
from edgellm.convert.quantize import int8_keeps, quantize_int4
from edgellm.manifest import read_manifest
from edgellm.record import Recorder, Table
from edgellm.runtime import measure
from edgellm.runtime.session import DecoderSession

HELDOUT = Path(__file__).resolve().parent.parent / "edgellm" / "data" / "heldout_en.txt"
SCHEMES = {"all 4-bit but lm_head": (0, ()), "edge 1": (1, ()), "edge 1 + down_proj": (1, ("down_proj",)),
           "edge 2": (2, ()), "edge 2 + down_proj (shipped)": (2, ("down_proj",))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", required=True)
    parser.add_argument("--int8", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved decode-probe rounds")
    parser.add_argument("--out", default="benchmarks/int4_schemes.json")
    args = parser.parse_args()
    recorder = Recorder("bench_int4_schemes", parameters=vars(args))
    fp32 = Path(args.fp32)
    m = read_manifest(fp32)
    tokens = Tokenizer.from_file(str(fp32 / "tokenizer.json")).encode(
        HELDOUT.read_text(encoding="utf-8"), add_special_tokens=False).ids[:2049]

    def session(path: Path) -> DecoderSession:
        return DecoderSession(path, m.io, m.dims, 640, threads=args.threads)

    reference = measure.perplexity(session(fp32 / "model.onnx"), tokens, 512)
    sessions = {"int8 (shipped default)": session(Path(args.int8) / "model.onnx")}
    scores = {"int8 (shipped default)": measure.perplexity(sessions["int8 (shipped default)"], tokens, 512)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (edge, projections) in SCHEMES.items():
            path = Path(tmp) / f"{len(sessions)}" / "model.onnx"
            path.parent.mkdir()
            save_model(quantize_int4(onnx.load(str(fp32 / "model.onnx")), int8_keeps(m.dims.num_layers, edge,
                                                                                      projections)), str(path))
            sessions[name] = session(path)
            scores[name] = measure.perplexity(sessions[name], tokens, 512)
            print(f"{name}: x{scores[name].perplexity / reference.perplexity:.4f}", flush=True)
        prompt = tokens[:40]
        speed: dict[str, list[float]] = {name: [] for name in sessions}
        for r in range(args.rounds):
            names = list(sessions)
            for name in names[r % len(names):] + names[:r % len(names)]:
                speed[name].append(measure.decode_probe(sessions[name], prompt, 24).decode_ms_per_token)
    base = "int8 (shipped default)"
    summary, rows = {}, []
    for name, score in scores.items():
        ratio = statistics.median(a / b for a, b in zip(speed[name], speed[base]))
        summary[name] = {"perplexity": round(score.perplexity, 3),
                         "perplexity_vs_fp32": round(score.perplexity / reference.perplexity, 4),
                         "greedy_agreement": round(float((score.argmax == reference.argmax).mean()), 4),
                         "decode_vs_int8_median": round(ratio, 3)}
        rows.append([name, summary[name]["perplexity_vs_fp32"], summary[name]["greedy_agreement"], round(ratio, 3)])
    summary["fp32_perplexity"] = round(reference.perplexity, 3)
    table = Table(["scheme", "held-out perplexity × fp32", "greedy agreement", "decode × int8"], rows)
    recorder.write(args.out, samples=speed, summary=summary, table=table,
                   notes=f"{m.name}, {args.threads} threads, 2048 held-out tokens in windows of 512")
    print(table.markdown())


if __name__ == "__main__":
    main()
