"""Greedy decoding of one model folder on two machines (x86-64 and emulated aarch64), compared.

    python greedy_check.py decode MODEL OUT.json [--new-tokens N] [--threads T]
        greedy ids of the 8 fixed prompts, each step's top-2 logit margin, decode ms/token, machine, versions
    python greedy_check.py compare X86.json ARM.json RESULTS.json [--junit JUNIT.xml] [--wall NAME=SECONDS ...]
        the verdict: per prompt, arm64's ids equal x86's, or first differ at a step where x86's top-2 margin was
        below MARGIN (a near-tie, which other kernels may break the other way: MLAS' int8 kernels for ARM round
        differently from x86's); anything else fails. Writes RESULTS.json (edgellm.record), prints it and the
        table, and exits 1 on a failure.

`decode` runs the runtime's greedy path (edgellm.runtime.measure.greedy, the one the convert gate and
`edgellm bench` use) with EOS ignored, so every prompt gives exactly N tokens. It imports only the runtime.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

MARGIN = 0.25  # a first difference is accepted only where x86's best two logits were closer than this
PROMPTS = [
    "Turn on the kitchen light and tell me the time.",
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23?",
    "Summarize in one sentence: the Raspberry Pi is a series of small single-board computers made in the UK.",
    "Tell me a short story about a robot who learns to paint.",
]
def decode(model: Path, out: Path, new_tokens: int, threads: int | None) -> None:
    import edgellm
    from edgellm.record import machine, versions
    from edgellm.runtime.measure import greedy

    started = time.perf_counter()
    # kernels=False: both machines run model.onnx on onnxruntime's kernels (x86 would otherwise run the folder's
    # kernel twin), so a divergence is ARM's int8 rounding, not a different graph
    llm = edgellm.load(model, threads=threads, kernels=False)
    load_s = time.perf_counter() - started
    results = []
    for prompt in PROMPTS:
        ids = llm.encode([{"role": "user", "content": prompt}])
        run = greedy(llm.session, ids, new_tokens, record=True)  # no EOS ids: exactly new_tokens tokens
        results.append({"prompt": prompt, "prompt_ids": ids, "ids": run.tokens,
                        "margins": [round(float(m), 5) for m in run.margins],
                        "prefill_ms": round(run.prefill_ms, 1), "decode_ms_per_token": round(run.decode_ms_per_token, 1)})
        print(f"{os.uname().machine}: {prompt[:40]!r}: {run.decode_ms_per_token:.0f} ms/token", file=sys.stderr,
              flush=True)
    report = {"machine": asdict(machine()), "versions": versions(), "threads": threads, "model": str(model),
              "new_tokens": new_tokens, "load_s": round(load_s, 2), "wall_s": round(time.perf_counter() - started, 1),
              "prompts": results}
    out.write_text(json.dumps(report, indent=1))


def first_difference(a: list[int], b: list[int]) -> int | None:
    for step, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return step
    return None if len(a) == len(b) else min(len(a), len(b))


def verdict(x86: dict, arm: dict) -> dict:
    row = {"prompt": x86["prompt"], "x86_ids": x86["ids"], "arm64_ids": arm["ids"],
           "x86_margins": x86["margins"], "arm64_margins": arm["margins"],
           "arm64_decode_ms_per_token": arm["decode_ms_per_token"], "arm64_prefill_ms": arm["prefill_ms"]}
    if x86["prompt_ids"] != arm["prompt_ids"]:
        return {**row, "status": "failed", "detail": "the tokenizer gave different prompt ids"}
    step = first_difference(x86["ids"], arm["ids"])
    if step is None:
        return {**row, "status": "identical", "detail": f"identical ({len(x86['ids'])} tokens)",
                "min_x86_margin": min(x86["margins"])}
    margin = x86["margins"][step] if step < len(x86["margins"]) else float("nan")
    near_tie = margin < MARGIN
    detail = (f"diverged at step {step}, x86 margin {margin:.3f} "
              f"{'< ' if near_tie else '>= '}{MARGIN} (arm64 margin {arm['margins'][step]:.3f})")
    return {**row, "status": "near-tie" if near_tie else "failed", "detail": detail, "step": step,
            "x86_margin": margin}


def junit_counts(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {"passed": 0, "failed": 1, "detail": f"no pytest report at {path}: the arm64 tests did not run"}
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    return {"passed": total - skipped - failed, "failed": failed, "skipped": skipped,
            "seconds": float(suite.get("time", 0))}


def compare(x86_path: Path, arm_path: Path, out: Path, junit: Path | None, walls: list[str]) -> int:
    from edgellm.record import Recorder, Table

    x86, arm = json.loads(x86_path.read_text()), json.loads(arm_path.read_text())
    if x86["new_tokens"] != arm["new_tokens"] or len(x86["prompts"]) != len(arm["prompts"]):
        raise SystemExit(f"{x86_path} and {arm_path} come from different settings: re-run both")
    rows = [verdict(a, b) for a, b in zip(x86["prompts"], arm["prompts"])]
    tests = junit_counts(junit)
    wall = {name: float(seconds) for name, _, seconds in (item.partition("=") for item in walls)}
    emulator = os.environ.get("ARM64_EMULATOR", "")
    table = Table(["prompt", f"x86-64 vs arm64 (greedy, {x86['new_tokens']} tokens)", "arm64 ms/token (emulated)"],
                  [[r["prompt"], ("FAILED: " if r["status"] == "failed" else "") + r["detail"],
                    r["arm64_decode_ms_per_token"]] for r in rows])
    counts = {status: sum(r["status"] == status for r in rows) for status in ("identical", "near-tie", "failed")}
    recorder = Recorder("test_arm64", parameters={
        "new_tokens": x86["new_tokens"], "margin_threshold": MARGIN, "model": x86["model"],
        "threads": arm["threads"], "emulator": emulator, "qemu_cpu": os.environ.get("ARM64_CPU") or "max"},
        command="bash scripts/test_arm64.sh",
        **({"started_utc": os.environ["ARM64_STARTED_UTC"]} if os.environ.get("ARM64_STARTED_UTC") else {}))
    recorder.write(out, samples={"x86_64": x86, "aarch64": arm},
                   summary={"prompts": counts, "verdicts": [{k: r[k] for k in r if not k.endswith(("_ids", "_margins"))}
                                                            for r in rows],
                            "runtime_tests_arm64": tests, "wall_s": wall,
                            "arm64_versions": arm["versions"], "arm64_machine": arm["machine"]},
                   table=table, notes="arm64 runs under qemu user-mode emulation: its ms/token is not a speed figure")
    text = out.read_text()
    print(re.sub(r"\[[^\[\]{}]*\]", lambda m: " ".join(m.group(0).split()), text))  # number lists on one line

    width = 44
    print(f"\n{table.columns[0]:<{width}}  {table.columns[1]:<58}  arm64 ms/token")
    for prompt, detail, ms in table.rows:
        prompt = prompt if len(prompt) <= width else prompt[:width - 3] + "..."
        print(f"{prompt:<{width}}  {detail:<58}  {ms:>8.0f}")
    print(f"real model: {counts['identical']} identical, {counts['near-tie']} diverged at a near-tie, "
          f"{counts['failed']} failed (onnxruntime {arm['versions']['onnxruntime']} aarch64 under "
          f"{emulator or 'emulation'}, CPU {os.environ.get('ARM64_CPU') or 'max'})")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()))
    print(f"runtime tests on arm64: {tests['passed']} passed, {tests['failed']} failed")
    print(f"results: {out}")
    passed, failed = tests["passed"] + counts["identical"] + counts["near-tie"], tests["failed"] + counts["failed"]
    # The closing line reads like pytest's, counting each prompt as one check.
    print(f"{str(failed) + ' failed, ' if failed else ''}{passed} passed in {wall.get('total', 0):.2f}s")
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("decode")
    d.add_argument("model", type=Path)
    d.add_argument("out", type=Path)
    d.add_argument("--new-tokens", type=int, default=12)
    d.add_argument("--threads", type=int, default=None)
    c = sub.add_parser("compare")
    c.add_argument("x86", type=Path)
    c.add_argument("arm", type=Path)
    c.add_argument("out", type=Path)
    c.add_argument("--junit", type=Path)
    c.add_argument("--wall", action="append", default=[], metavar="NAME=SECONDS")
    args = parser.parse_args()
    if args.command == "decode":
        decode(args.model, args.out, args.new_tokens, args.threads)
        return 0
    return compare(args.x86, args.arm, args.out, args.junit, args.wall)


if __name__ == "__main__":
    raise SystemExit(main())
