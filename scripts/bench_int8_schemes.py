"""Why this int8 scheme: quality, size and speed of weight-only quantization schemes, side by side.

    python scripts/bench_int8_schemes.py --work .cache/int8-schemes --out benchmarks/int8_schemes.json \
        [--alphas 0,0.35,0.5,0.65,0.8] [--shipped .cache/models/smollm2-135m-instruct]

1. SmoothQuant α sweep: `edgellm convert smollm2-135m-instruct --smooth-alpha A --no-gate` for each
   --alphas value (0 = off), into WORK/alpha-A/ (skipped when already there; 1-2 min each on an idle
   2-core machine). α 0 also keeps its fp32 export (--keep-fp32): the fp32 reference. --shipped adds
   an already converted default folder (its α read from its manifest) without converting it again.
2. Other schemes, quantized here from the (unsmoothed) fp32 reference with onnxruntime's
   MatMulNBitsQuantizer (the embedding stays fp32 in these, only the MatMuls change), to compare
   with "int8 sym, acc 4, no SmoothQuant": asymmetric 8-bit (uint8 zero points), accuracy_level 1
   (fp32 activations), 4-bit symmetric.
3. Every model is measured against the fp32 reference through the runtime's session:
   - held-out perplexity and teacher-forced greedy agreement on the convert gate's text
     (edgellm/data/heldout_en.txt, 2,048 tokens, windows of 512);
   - the standard deviation of (logits - fp32 logits) over the first window's 512 positions;
   - chat: fp32's greedy replies (<= 32 tokens) to the gate's 20 chat prompts, teacher-forced
     (token agreement), and free-running greedy replies identical to fp32's (count of 20);
   - size of model.onnx + model.onnx.data;
   - decode ms/token (prefill the 37-token chat prompt, then --steps greedy steps), all models
     interleaved in --repeats rounds in this one process; medians. Slow schemes (more than --slow
     times the fastest model's first-round time) run 8 steps after the first round and skip the
     free-running chat replies.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench_optimizations import PROMPT as SPEED_PROMPT  # the same chat prompt as the other benchmarks
from edgellm.manifest import read_manifest
from edgellm.record import Recorder, Table
from edgellm.convert.validate import CHAT_PROMPTS  # the convert gate's chat prompts
from edgellm.runtime import measure
from edgellm.runtime.session import DecoderSession

ROOT = Path(__file__).resolve().parent.parent
HELDOUT = ROOT / "edgellm" / "data" / "heldout_en.txt"
VARIANTS = {  # name: (bits, symmetric, accuracy_level)
    "8-bit asymmetric (uint8 zero points), accuracy_level 4": (8, False, 4),
    "8-bit symmetric, accuracy_level 1 (fp32 activations)": (8, True, 1),
    "4-bit symmetric, block 32, accuracy_level 4": (4, True, 4),
}


def alpha_dir(work: Path, alpha: float) -> Path:
    return work / f"alpha-{alpha:g}"


def convert_alpha(work: Path, alpha: float, keep_fp32: bool, threads: int) -> Path:
    """WORK/alpha-A, converted unless already there (a finished folder is only ever renamed into place)."""
    out = alpha_dir(work, alpha)
    if (out / "edgellm.json").is_file() and (not keep_fp32 or (out / "reference" / "model.onnx").is_file()):
        return out
    cmd = [sys.executable, "-m", "edgellm.cli", "convert", "smollm2-135m-instruct", "-o", str(out), "--force",
           "--no-gate", "--quiet", "--smooth-alpha", str(alpha), "--threads", str(threads)]
    print(f"[convert] {' '.join(cmd[2:])}", file=sys.stderr)
    subprocess.run(cmd + (["--keep-fp32"] if keep_fp32 else []), check=True)
    return out


def quantize_variant(fp32_model: Path, out: Path, bits: int, symmetric: bool, accuracy_level: int) -> Path:
    import onnx
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from edgellm.convert.graph import save_model

    path = out / "model.onnx"
    if path.is_file():
        return path
    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=symmetric, accuracy_level=accuracy_level,
                                          quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
                                          bits=bits)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(fp32_model)), bits=bits, block_size=32, is_symmetric=symmetric,
                                     accuracy_level=accuracy_level, algo_config=config)
    quantizer.process()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_model(quantizer.model.model, str(staging / "model.onnx"))
    staging.rename(out)  # whole or absent
    return path


def size_bytes(model: Path) -> int:
    return sum(p.stat().st_size for p in (model, Path(str(model) + ".data")) if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "int8-schemes")
    ap.add_argument("--alphas", default="0,0.35,0.5,0.65,0.8", help="α values to convert (0 = off, required)")
    ap.add_argument("--shipped", type=Path, help="an already converted int8 folder to include (α from its manifest)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--slow", type=float, default=8.0, help="a model this many times slower than the fastest is 'slow'")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "int8_schemes.json")
    args = ap.parse_args()
    rec = Recorder("bench_int8_schemes", parameters=vars(args))
    alphas = [float(a) for a in args.alphas.split(",")]
    if 0.0 not in alphas:
        ap.error(f"--alphas {args.alphas} must include 0: its fp32 export is the reference")

    folders = {a: convert_alpha(args.work, a, a == 0.0, args.threads) for a in alphas}
    shipped_alpha = None
    if args.shipped:
        smoothing = read_manifest(args.shipped).quantization.get("smoothing") or {}
        shipped_alpha = float(smoothing.get("alpha") or 0.0)
        folders[shipped_alpha] = args.shipped
    folder = folders[0.0]
    manifest = read_manifest(folder)
    models = {"fp32 (reference)": folder / "reference" / "model.onnx"}
    labels = {}
    for a, path in sorted(folders.items()):
        name = f"int8 sym, acc 4, SmoothQuant α {a:g}" if a else "int8 sym, acc 4, no SmoothQuant"
        name += " (shipped)" if a == shipped_alpha else ""
        models[name], labels[name] = path / "model.onnx", a
    reference = folder / "reference" / "model.onnx"
    for name, (bits, sym, level) in VARIANTS.items():
        models[f"{name}, no SmoothQuant"] = quantize_variant(
            reference, args.work / f"variant-{bits}bit-{'sym' if sym else 'asym'}-acc{level}", bits, sym, level)

    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    heldout = tokenizer.encode(HELDOUT.read_text(), add_special_tokens=False).ids[:2049]
    import edgellm

    llm = edgellm.load(folder, threads=args.threads)
    chats = [llm.encode([{"role": "user", "content": q}]) for q in CHAT_PROMPTS]
    eos = tuple(manifest.generation.eos_token_ids)
    del llm
    capacity = 600
    sessions = {name: DecoderSession(path, manifest.io, manifest.dims, capacity, threads=args.threads,
                                     graph=manifest.graph) for name, path in models.items()}

    # speed first, interleaved
    speed: dict[str, list[float]] = {name: [] for name in sessions}
    slow: set[str] = set()
    for _ in range(args.repeats):
        for name, session in sessions.items():
            steps = 8 if name in slow else args.steps
            speed[name].append(measure.decode_probe(session, SPEED_PROMPT, steps).decode_ms_per_token)
        fastest = min(v[0] for v in speed.values())
        slow = {name for name, v in speed.items() if v[0] > args.slow * fastest}
        print("[speed] " + ", ".join(f"{n[:24]} {v[-1]:.1f}" for n, v in speed.items()), file=sys.stderr)

    ref = sessions["fp32 (reference)"]
    ref_ppl = measure.perplexity(ref, heldout, 512)
    ref.truncate(0)
    ref_logits = ref.forward(heldout[:512], keep=512).copy()
    ref_replies = [measure.greedy(ref, ids, 32, eos).tokens for ids in chats]
    rows, samples = {}, {"decode_ms_per_token": speed}
    for name, session in sessions.items():
        ppl = measure.perplexity(session, heldout, 512)
        session.truncate(0)
        diff = session.forward(heldout[:512], keep=512) - ref_logits
        agree = total = 0
        for ids, reply in zip(chats, ref_replies):
            session.truncate(0)
            predicted = session.forward(ids + reply[:-1], keep=len(reply)).argmax(-1)
            agree += int((predicted == np.asarray(reply)).sum())
            total += len(reply)
        exact = None
        if name not in slow:
            exact = sum(measure.greedy(session, ids, 32, eos).tokens == reply for ids, reply in zip(chats, ref_replies))
        session.truncate(0)
        rows[name] = {"perplexity": round(ppl.perplexity, 3), "ppl_ratio": round(ppl.perplexity / ref_ppl.perplexity, 4),
                      "greedy_agreement": round(float((ppl.argmax == ref_ppl.argmax).mean()), 4),
                      "logit_diff_std": round(float(diff.std()), 4),
                      "chat_agreement": round(agree / total, 4), "chat_tokens": total,
                      "exact_replies": exact, "chat_prompts": len(chats), "size_bytes": size_bytes(models[name]),
                      "decode_ms_per_token": round(statistics.median(speed[name]), 2), "alpha": labels.get(name)}
        print(f"[quality] {name}: {rows[name]}", file=sys.stderr)

    def fmt_exact(r):
        return f"{r['exact_replies']}/{r['chat_prompts']}" if r["exact_replies"] is not None else "— (too slow)"

    scheme_names = ["fp32 (reference)"] + [n for n in labels if "shipped" in n or not labels[n]]
    scheme_names += [f"{n}, no SmoothQuant" for n in VARIANTS]
    schemes = Table(
        ["scheme (MatMulNBits, block 32)", "held-out ppl (× fp32)", "greedy agreement", "logit diff std vs fp32",
         "size MB", "decode ms/token"],
        [[n, f"{rows[n]['perplexity']:.2f} (×{rows[n]['ppl_ratio']:.4f})", f"{rows[n]['greedy_agreement']:.3f}",
          f"{rows[n]['logit_diff_std']:.3f}", f"{rows[n]['size_bytes'] / 1e6:.0f}", f"{rows[n]['decode_ms_per_token']:.2f}"]
         for n in scheme_names])
    sweep = Table(
        ["α (`--smooth-alpha`)", "ppl ratio", "prose agreement", "chat-reply agreement (20 prompts, teacher-forced)",
         "free-running replies identical to fp32 (20 prompts)"],
        [[f"{labels[n]:g}" if labels[n] else "off", f"{rows[n]['ppl_ratio']:.4f}", f"{rows[n]['greedy_agreement']:.3f}",
          f"{rows[n]['chat_agreement']:.3f}", fmt_exact(rows[n])] for n in labels])
    path = rec.write(args.out, samples=samples, summary=rows, table=schemes, tables={"alpha_sweep": sweep},
                     notes=f"reference fp32 perplexity {ref_ppl.perplexity:.3f} on {ref_ppl.tokens} tokens")
    print(schemes.markdown() + "\n\n" + sweep.markdown())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
