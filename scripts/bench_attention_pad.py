"""Cost of the attention pad row (converter revision 3): decode ms/token of model folders, side by side.

    python scripts/bench_attention_pad.py BASELINE_FOLDER OTHER_FOLDER [...] --threads 2 --context 1024

Interleaved repeats in one process, greedy, same prompt; also checks which folder's logits are
bit-identical between one-token steps and a multi-token pass (what speculative decoding needs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from edgellm.manifest import read_manifest
from edgellm.runtime.session import DecoderSession

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182,
          2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


def open_session(folder: Path, capacity: int, threads: int) -> DecoderSession:
    m = read_manifest(folder)
    return DecoderSession(folder / "model.onnx", m.io, m.dims, capacity, threads=threads)


def decode_ms(session: DecoderSession, prompt: list[int], steps: int) -> float:
    session.truncate(0)
    logits = session.forward(prompt)
    start = time.perf_counter()
    for _ in range(steps):
        logits = session.forward([int(np.argmax(logits))])
    return (time.perf_counter() - start) / steps * 1e3


def batch_invariant(session: DecoderSession, prompt: list[int], steps: int = 8) -> float:
    """Largest logit difference between one-token steps and one pass over the same tokens."""
    session.truncate(0)
    logits, stepped, tokens = session.forward(prompt)[-1].copy(), [], []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        stepped.append(logits)
        logits = session.forward([tokens[-1]])[-1].copy()
    session.truncate(len(prompt) - 1)
    batched = session.forward([prompt[-1]] + tokens[:-1], keep=steps)
    return float(np.abs(batched - np.stack(stepped)).max())


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
            times[name].append(decode_ms(session, prompt, args.steps))
    report = {name: {"decode_ms_per_token": round(statistics.median(t), 2),
                     "max_logit_diff_step_vs_pass": batch_invariant(sessions[name], prompt)}
              for name, t in times.items()}
    baseline = report[str(args.folders[0])]["decode_ms_per_token"]
    for name in sessions:
        report[name]["over_baseline"] = round(report[name]["decode_ms_per_token"] / baseline, 3)
    report.update(threads=args.threads, context=args.context, steps=args.steps, repeats=args.repeats)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
