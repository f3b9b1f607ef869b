#!/usr/bin/env python
"""One kernel setting's values side by side: decode and prompt time of the shipped kernel graph, per value.

    python scripts/bench_kernel_setting.py --model .cache/models/smollm2-135m-instruct \
        --setting EDGELLM_KERNEL_PREFETCH --values 0,512,1088,4352,17408 --threads 1,2 \
        --out benchmarks/prefetch_distance.json

Where bench_kernel_steps.py adds one optimization at a time, this script tunes one: each (value, thread count)
runs the folder's model.kernels.onnx in a fresh process of its own with the environment variable set to the
value (bench_kernel_steps.py --worker: decode_probe on the bare session, the bench chat request prefilled,
then --steps greedy tokens, --probes times), values alternating in a rotating order every round. Medians over
all probes of all rounds; "× first" is the ratio of medians against the first value. Any int8 or int4 folder
with a kernel graph; --model may be given more than once (one table, rows per folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgellm.record import Recorder, Table  # noqa: E402

STEPS_SCRIPT = ROOT / "scripts" / "bench_kernel_steps.py"


def run_worker(folder: Path, threads: int, prompt: list[int], steps: int, probes: int,
               setting: str, value: str) -> dict[str, list[float]]:
    cfg = {"folder": str(folder), "graph": "model.kernels.onnx", "threads": threads, "prompt": prompt,
           "steps": steps, "probes": probes}
    run = subprocess.run([sys.executable, str(STEPS_SCRIPT), "--worker", json.dumps(cfg)], capture_output=True,
                         text=True, timeout=600, env={**os.environ, setting: value})
    if run.returncode != 0:
        sys.exit(f"{setting}={value} at {threads} threads on {folder} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, action="append", required=True, help="kernel-graph folder (repeatable)")
    ap.add_argument("--setting", required=True, help="environment variable, e.g. EDGELLM_KERNEL_PREFETCH")
    ap.add_argument("--values", required=True, help="comma-separated values; the first is the baseline")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--probes", type=int, default=5, help="probes per process")
    ap.add_argument("--steps", type=int, default=64, help="greedy tokens per probe")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import edgellm
    from edgellm import kernels
    from edgellm.bench import BENCH_MESSAGES

    if kernels.library_path() is None:
        sys.exit("edgellm's kernel library is not built here. Fix: python -m edgellm.kernels build")
    for folder in args.model:
        if not (folder / "model.kernels.onnx").is_file():
            sys.exit(f"{folder} has no model.kernels.onnx. Fix: convert it again with this edgellm (cpu, int8/int4)")
    values = [v.strip() for v in args.values.split(",") if v.strip()]
    if len(values) < 2:
        sys.exit(f"--values {args.values!r}: give at least two values to compare, e.g. --values 0,4352")
    threads = [int(t) for t in args.threads.split(",")]
    recorder = Recorder("bench_kernel_setting", {**vars(args), "model": [str(m) for m in args.model]})
    prompt = edgellm.load(args.model[0], kernels=False).encode(BENCH_MESSAGES)
    samples = {m.name: {str(t): {v: {"prefill_ms": [], "decode_ms_per_token": []} for v in values} for t in threads}
               for m in args.model}
    for round_ in range(args.rounds):
        order = values[round_ % len(values):] + values[:round_ % len(values)]
        for folder in args.model:
            for t in threads:
                for value in order:
                    result = run_worker(folder, t, prompt, args.steps, args.probes, args.setting, value)
                    for key in ("prefill_ms", "decode_ms_per_token"):
                        samples[folder.name][str(t)][value][key] += result[key]
                    print(f"round {round_ + 1} {folder.name} threads {t} {args.setting}={value}: decode "
                          f"{statistics.median(result['decode_ms_per_token']):.2f} ms/token", flush=True)
    summary: dict = {}
    rows = []
    for folder in args.model:
        for t in threads:
            runs = samples[folder.name][str(t)]
            base = statistics.median(runs[values[0]]["decode_ms_per_token"])
            for value in values:
                decode = statistics.median(runs[value]["decode_ms_per_token"])
                prefill = statistics.median(runs[value]["prefill_ms"])
                summary.setdefault(folder.name, {}).setdefault(str(t), {})[value] = {
                    "decode_ms_per_token": round(decode, 3), "prefill_ms": round(prefill, 2),
                    "decode_vs_first": round(decode / base, 3), "probes": len(runs[value]["decode_ms_per_token"])}
                rows.append([folder.name, t, value, round(decode, 2), round(decode / base, 3), round(prefill, 1)])
    table = Table(["model", "threads", args.setting, "decode ms/token", "× first", f"prompt ({len(prompt)} tokens) ms"],
                  rows)
    recorder.write(args.out, samples, summary, table)
    print(table.markdown())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
