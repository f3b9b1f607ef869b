"""Cost of `edgellm convert --batch-invariant`: decode ms/token and step-vs-pass logits, side by side.

    python scripts/bench_attention_pad.py BASELINE_FOLDER OTHER_FOLDER [...] --threads 2 --contexts 37,512 \
        --out benchmarks/attention_pad.json

For each context length C (the chat prompt repeated to C tokens), in one process:
- decode ms/token: prefill C tokens, then --steps greedy steps; folders interleaved over --repeats
  rounds, medians (edgellm.runtime.measure.decode_probe);
- the largest logit difference between C tokens fed one by one and the same C tokens in one pass,
  and whether they are bit-identical (edgellm.runtime.measure.kv_consistency, over all C positions:
  what speculative verification and prefix-cache hits need at that context).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from bench_optimizations import PROMPT  # the same chat prompt as the other runtime benchmarks
from edgellm.manifest import read_manifest
from edgellm.record import Recorder, Table
from edgellm.runtime.measure import decode_probe, kv_consistency
from edgellm.runtime.session import DecoderSession


def open_session(folder: Path, capacity: int, threads: int) -> DecoderSession:
    m = read_manifest(folder)
    return DecoderSession(folder / "model.onnx", m.io, m.dims, capacity, threads=threads, graph=m.graph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="the first is the baseline for the ratios")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", default=str(len(PROMPT)), help="comma list of context lengths in tokens")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "benchmarks" /
                        "attention_pad.json", help="results file (edgellm.record)")
    args = parser.parse_args()
    rec = Recorder("bench_attention_pad", parameters=vars(args))
    contexts = [int(c) for c in args.contexts.split(",")]
    capacity = max(contexts) + args.steps + 8
    names = [str(folder) for folder in args.folders]
    sessions = {name: open_session(folder, capacity, args.threads) for name, folder in zip(names, args.folders)}
    samples: dict = {}
    summary: dict = {}
    for context in contexts:
        prompt = (PROMPT * (context // len(PROMPT) + 1))[:context]
        times: dict[str, list[float]] = {name: [] for name in names}
        for session in sessions.values():  # warm-up at this context
            decode_probe(session, prompt, 4)
        for _ in range(args.repeats):
            for name, session in sessions.items():
                times[name].append(decode_probe(session, prompt, args.steps).decode_ms_per_token)
        checks = {name: kv_consistency(session, prompt) for name, session in sessions.items()}
        samples[context] = {"decode_ms_per_token": times, "kv_consistency": checks}
        base = statistics.median(times[names[0]])
        summary[context] = {name: {"decode_ms_per_token": round(statistics.median(times[name]), 2),
                                   "over_baseline": round(statistics.median(times[name]) / base, 3),
                                   "max_logit_diff_step_vs_pass": checks[name].max_abs_diff_stepwise,
                                   "bit_identical": checks[name].bit_identical} for name in names}
        print(f"[{context} tokens] {summary[context]}", file=sys.stderr)
    labels = {name: read_manifest(Path(name)).graph.batch_invariant for name in names}
    columns = ["context", "threads"] + [f"{'`--batch-invariant`' if labels[n] else 'default graph'} ({Path(n).name}): "
                                        "max logit diff step vs pass / decode ms/token" for n in names]
    columns += [f"cost of {Path(n).name}" for n in names[1:]]
    body = []
    for context, row in summary.items():
        cells = [f"{context} tokens", str(args.threads)]
        cells += [f"{row[n]['max_logit_diff_step_vs_pass']:.3g} / {row[n]['decode_ms_per_token']:.2f}" for n in names]
        cells += [f"{(row[n]['over_baseline'] - 1) * 100:+.1f}%" for n in names[1:]]
        body.append(cells)
    table = Table(columns, body)
    path = rec.write(args.out, samples=samples, summary=summary, table=table)
    print(table.markdown())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
