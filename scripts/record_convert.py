"""Run `edgellm convert` once and keep what it measured (validation gate, sizes, time) as a results file.

    python scripts/record_convert.py smollm2-135m-instruct -o OUT --target cuda --json benchmarks/gpu_target_convert.json

Everything after the source is passed to `edgellm convert` (plus --json --quiet); the results file holds the
convert's own JSON summary (perplexities, agreement, sizes, seconds) with the machine, load and versions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from edgellm.record import Recorder, Table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source")
    parser.add_argument("--json", type=Path, required=True, help="results file to write")
    args, convert_args = parser.parse_known_args()
    recorder = Recorder("record_convert", parameters={"source": args.source, "convert_args": convert_args})
    command = [sys.executable, "-m", "edgellm.cli", "convert", args.source, *convert_args, "--json", "--quiet"]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"convert failed: {done.stderr.strip()}")
    summary = json.loads(done.stdout)
    v = summary["validation"]
    name = v.get("candidate")
    rows = [["fp32", v["fp32"]["perplexity"], "", "", round(v["sizes_bytes"]["fp32"] / 1e6)]]
    if name:
        chat = v.get("chat_agreement", {}).get("agreement", "")
        rows.append([f"{name} (--target {summary['target']})", v[name]["perplexity"],
                     f"{v['perplexity_ratio']:.4f} / {v['greedy_agreement']:.3f}", chat,
                     round(v["sizes_bytes"][name] / 1e6)])
    table = Table(["graph", "held-out ppl", "ppl ratio / greedy agreement vs fp32", "chat agreement", "MB"], rows,
                  caption=f"edgellm convert {args.source} {' '.join(convert_args)}: {summary['seconds']:.0f} s "
                          f"(wall {wall:.0f} s with start-up); validated on {v.get('provider', 'the CPU')}")
    path = recorder.write(args.json, samples={"convert_summary": summary, "wall_s": round(wall, 1)},
                          summary={"seconds": summary["seconds"], "perplexity_ratio": v.get("perplexity_ratio")},
                          table=table)
    print(table.markdown())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
