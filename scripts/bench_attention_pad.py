"""Cost of `edgellm convert --batch-invariant`: decode ms/token of model folders, side by side.

    python scripts/bench_attention_pad.py BASELINE_FOLDER OTHER_FOLDER [...] --threads 2 --context 1024

Interleaved repeats in one process, greedy, same prompt; also checks which folder's logits are
bit-identical between one-token steps and a multi-token pass (what speculative decoding needs).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench_optimizations import PROMPT  # the same chat prompt as the other runtime benchmarks
from edgellm.manifest import read_manifest
from edgellm.runtime.measure import decode_probe, kv_consistency
from edgellm.runtime.session import DecoderSession


def open_session(folder: Path, capacity: int, threads: int) -> DecoderSession:
    m = read_manifest(folder)
    return DecoderSession(folder / "model.onnx", m.io, m.dims, capacity, threads=threads, graph=m.graph)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", type=Path, nargs="+", help="the first is the baseline for the ratios")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=len(PROMPT))
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    prompt = (PROMPT * (args.context // len(PROMPT) + 1))[:args.context]
    capacity = args.context + args.steps + 8
    sessions = {str(folder): open_session(folder, capacity, args.threads) for folder in args.folders}
    times = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, session in sessions.items():
            times[name].append(decode_probe(session, prompt, args.steps).decode_ms_per_token)
    report = {}
    for name, session in sessions.items():
        check = kv_consistency(session, (PROMPT * 2)[:48])  # what `edgellm convert` checks, on 48 tokens
        report[name] = {"decode_ms_per_token": round(statistics.median(times[name]), 2),
                        "max_logit_diff_step_vs_pass": check.max_abs_diff_stepwise,
                        "bit_identical": check.bit_identical}
    baseline = report[str(args.folders[0])]["decode_ms_per_token"]
    for name in sessions:
        report[name]["over_baseline"] = round(report[name]["decode_ms_per_token"] / baseline, 3)
    report.update(threads=args.threads, context=args.context, steps=args.steps, repeats=args.repeats)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
