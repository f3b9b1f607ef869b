"""Greedy decoding of one model folder on two machines (x86-64 and emulated aarch64), compared.

    python greedy_check.py decode MODEL OUT.json [--new-tokens N] [--threads T]
        greedy ids of the 8 fixed prompts, each step's top-2 logit margin, decode ms/token, package versions
    python greedy_check.py compare X86.json ARM.json RESULTS.json [--junit JUNIT.xml] [--wall NAME=SECONDS ...]
        the verdict: per prompt, arm64's ids equal x86's, or first differ at a step where x86's top-2 margin was
        below MARGIN (a near-tie, which other kernels may break the other way: MLAS' int8 kernels for ARM round
        differently from x86's); anything else fails. Prints the table, writes RESULTS.json, exits 1 on a failure.

`decode` runs the runtime's own generation path (LLM.generate at temperature 0, EOS ignored so every prompt
gives exactly N tokens) and copies the logits each step chose from. It imports only the runtime (no torch).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

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
PACKAGES = ("edgellm", "onnxruntime", "numpy", "tokenizers")


def cpu_info() -> dict:
    """CPU model name and flags as /proc/cpuinfo shows them (under emulation: what the emulator reports)."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "flags", "features", "cpu implementer", "cpu part") and key not in fields:
            fields[key] = value.strip()
    return fields


def versions() -> dict:
    return {name: metadata.version(name) for name in PACKAGES}


def decode(model: Path, out: Path, new_tokens: int, threads: int | None) -> None:
    import edgellm
    from edgellm import SamplingParams

    started = time.perf_counter()
    llm = edgellm.load(model, threads=threads)
    load_s = time.perf_counter() - started
    session = llm.session
    forward = session.forward
    rows: list[np.ndarray] = []

    def recording_forward(token_ids, keep=1):  # the generator picks each token from the last row of a call
        logits = forward(token_ids, keep)
        rows.append(np.array(logits[-1], dtype=np.float32))
        return logits

    session.forward = recording_forward
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    results = []
    for prompt in PROMPTS:
        llm.reset()
        rows.clear()
        messages = [{"role": "user", "content": prompt}]
        result = llm.generate(messages, params)
        ids = list(result.token_ids)
        chosen = np.stack(rows[-len(ids):])  # the prefill's last call, then one call per fed-back token
        if [int(i) for i in chosen.argmax(-1)] != ids:
            raise SystemExit(f"recorded logits do not match the generated ids for {prompt!r}: the generator changed; "
                             "fix the recording in scripts/arm64/greedy_check.py")
        top2 = np.sort(chosen, axis=-1)[:, -2:]
        results.append({
            "prompt": prompt, "prompt_ids": llm.encode(messages), "ids": ids,
            "margins": [round(float(m), 5) for m in top2[:, 1] - top2[:, 0]],
            "prefill_ms": round(result.timings.prefill_ms, 1),
            "decode_ms_per_token": round(result.timings.decode_ms_per_token, 1),
        })
        print(f"{platform.machine()}: {prompt[:40]!r}: {result.timings.decode_ms_per_token:.0f} ms/token",
              file=sys.stderr, flush=True)
    report = {"machine": platform.machine(), "python": platform.python_version(), "packages": versions(),
              "cpu": cpu_info(), "threads": threads, "model": str(model), "new_tokens": new_tokens,
              "load_s": round(load_s, 2), "wall_s": round(time.perf_counter() - started, 1), "prompts": results}
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


def git_revision(repo: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def compare(x86_path: Path, arm_path: Path, out: Path, junit: Path | None, walls: list[str]) -> int:
    x86, arm = json.loads(x86_path.read_text()), json.loads(arm_path.read_text())
    if x86["new_tokens"] != arm["new_tokens"] or len(x86["prompts"]) != len(arm["prompts"]):
        raise SystemExit(f"{x86_path} and {arm_path} come from different settings: re-run both")
    rows = [verdict(a, b) for a, b in zip(x86["prompts"], arm["prompts"])]
    tests = junit_counts(junit)
    wall = {}
    for item in walls:
        name, _, seconds = item.partition("=")
        wall[name] = float(seconds)
    results = {
        "command": " ".join(["bash", "scripts/test_arm64.sh"]),
        "git_revision": git_revision(Path(__file__).resolve().parents[2]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"cpu": cpu_info(), "loadavg": list(os.getloadavg()), "packages": x86["packages"],
                 "python": x86["python"]},
        "arm64": {"machine": arm["machine"], "cpu_as_emulated": arm["cpu"], "packages": arm["packages"],
                  "python": arm["python"], "threads": arm["threads"], "load_s": arm["load_s"],
                  "emulator": os.environ.get("ARM64_EMULATOR", "")},
        "model": x86["model"], "new_tokens": x86["new_tokens"], "margin_threshold": MARGIN,
        "prompts": rows, "runtime_tests": tests, "wall_s": wall,
    }
    text = json.dumps(results, indent=1)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(re.sub(r"\[[^\[\]{}]*\]", lambda m: " ".join(m.group(0).split()), text))  # lists of numbers on one line

    width = 44
    print(f"\n{'prompt':<{width}}  {'x86-64 vs arm64 (greedy, ' + str(x86['new_tokens']) + ' tokens)':<58}  "
          "arm64 ms/token")
    for row in rows:
        prompt = row["prompt"] if len(row["prompt"]) <= width else row["prompt"][:width - 3] + "..."
        flag = "" if row["status"] != "failed" else "FAILED: "
        print(f"{prompt:<{width}}  {flag + row['detail']:<58}  {row['arm64_decode_ms_per_token']:>8.0f}")
    identical = sum(r["status"] == "identical" for r in rows)
    ties = sum(r["status"] == "near-tie" for r in rows)
    bad = sum(r["status"] == "failed" for r in rows)
    print(f"real model: {identical} identical, {ties} diverged at a near-tie, {bad} failed "
          f"(onnxruntime {arm['packages']['onnxruntime']} aarch64 under {results['arm64']['emulator'] or 'emulation'})")
    print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items()))
    print(f"runtime tests on arm64: {tests['passed']} passed, {tests['failed']} failed")
    print(f"results: {out}")
    passed, failed = tests["passed"] + identical + ties, tests["failed"] + bad
    total_s = wall.get("total", sum(wall.values()))
    # The closing line reads like pytest's, counting each prompt as one check.
    print(f"{str(failed) + ' failed, ' if failed else ''}{passed} passed in {total_s:.2f}s")
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
