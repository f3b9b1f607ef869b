"""What a GPU folder (`edgellm convert --target cuda`) costs where there is no GPU: decode on the CPU provider,
side by side with the CPU folders of the same model (interleaved repeats in one process, greedy, same prompt).

    python scripts/bench_gpu_graph_cpu.py --cpu-int8 DIR --cuda DIR [--fp32 DIR] --threads 2 --repeats 5 \
        --json benchmarks/gpu_graph_on_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from bench_optimizations import PROMPT  # the same chat prompt as the other runtime benchmarks
from edgellm.manifest import read_manifest
from edgellm.record import Recorder, Table
from edgellm.runtime.measure import decode_probe
from edgellm.runtime.session import DecoderSession


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-int8", type=Path, required=True, help="the baseline: the CPU int8 folder")
    parser.add_argument("--cuda", type=Path, required=True, help="the same model converted --target cuda")
    parser.add_argument("--fp32", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/gpu_graph_on_cpu.json"))
    args = parser.parse_args()
    recorder = Recorder("bench_gpu_graph_cpu", parameters=vars(args))
    folders = {"cpu int8": args.cpu_int8, "cuda graph on CPU": args.cuda}
    if args.fp32:
        folders["cpu fp32"] = args.fp32
    sessions = {}
    for label, folder in folders.items():
        m = read_manifest(folder)
        sessions[label] = DecoderSession(folder / m.files["model"], m.io, m.dims, len(PROMPT) + args.steps + 8,
                                         providers="cpu", threads=args.threads, graph=m.graph)
    samples = {label: {"decode_ms_per_token": [], "prefill_ms": []} for label in sessions}
    for _ in range(args.repeats):
        for label, session in sessions.items():
            probe = decode_probe(session, PROMPT, args.steps)
            samples[label]["decode_ms_per_token"].append(probe.decode_ms_per_token)
            samples[label]["prefill_ms"].append(probe.prefill_ms)
    summary = {label: {k: round(statistics.median(v), 2) for k, v in s.items()} for label, s in samples.items()}
    base = summary["cpu int8"]["decode_ms_per_token"]
    rows = [[label, s["prefill_ms"], s["decode_ms_per_token"], round(s["decode_ms_per_token"] / base, 2)]
            for label, s in summary.items()]
    table = Table(["folder (CPU provider)", "prefill ms", "decode ms/token", "decode × cpu int8"], rows,
                  caption=f"{len(PROMPT)}-token prompt, {args.steps} greedy steps, {args.threads} threads, "
                          f"median of {args.repeats} interleaved repeats")
    path = recorder.write(args.json, samples=samples, summary=summary, table=table)
    print(table.markdown())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
