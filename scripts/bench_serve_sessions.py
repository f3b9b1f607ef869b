#!/usr/bin/env python
"""How many interleaved conversations keep their prefix cache: `edgellm serve --sessions 1` vs `--sessions N`.

Each setting starts its own server on 127.0.0.1 (response cache off, so every turn is generated), then
--conversations multi-turn chats take turns one request at a time (c0 t0, c1 t0, ..., c0 t1, ...), each
turn carrying the whole history (greedy, so both settings see the same prompts). With one KV cache a
turn finds only the shared system prompt cached (the previous request was another conversation); with
one session per conversation it finds its whole history. Reports cached/prompt tokens, client-side TTFT
of the streamed turns and the server's RSS — the memory each extra session costs.

    python scripts/bench_serve_sessions.py --model .cache/models/smollm2-135m-instruct \\
        --out benchmarks/serve_sessions.json
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import httpx2 as httpx

from serve_client import chat, env_with_repo, percentile, rss_mb, wait_ready

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgellm.record import Recorder, Table  # noqa: E402

SYSTEM = "You are a helpful assistant on a kiosk in a city museum. Answer in one or two short sentences."
TURNS = ["What are the opening hours?", "And on Sundays?", "How much is a ticket?", "Is there a discount for students?",
         "Where is the cafe?", "What food does it serve?", "Thanks! Anything else I should see?"]
URL_LINE = re.compile(r"at (http://\S+)/v1")


def run_setting(sessions: int, args) -> tuple[list[dict], dict]:
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", "-m", str(args.model), "--port", "0", "--sessions",
           str(sessions), "--no-response-cache"] + (["--threads", str(args.threads)] if args.threads else [])
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env_with_repo(ROOT))
    url = next(m.group(1) for line in process.stdout if (m := URL_LINE.search(line)))
    try:
        wait_ready(url, process)
        rss_ready = rss_mb(process.pid)
        histories = [[{"role": "system", "content": SYSTEM}] for _ in range(args.conversations)]
        rows = []
        with httpx.Client() as http:
            for turn in range(args.turns):
                for c, history in enumerate(histories):
                    history.append({"role": "user", "content": TURNS[(turn + c) % len(TURNS)]})
                    body = {"model": "m", "messages": history, "max_tokens": args.max_tokens, "temperature": 0,
                            "stream": True}
                    sample = chat(http, url, body, c, turn)
                    if sample.category != "complete":
                        raise SystemExit(f"error: turn {turn} of conversation {c}: {sample.error}")
                    history.append({"role": "assistant", "content": sample.text})
                    rows.append(asdict(sample) | {"sessions": sessions, "turn": turn})
        rss_end = rss_mb(process.pid)
    finally:
        process.send_signal(2)
        process.wait(30)
    later = [r for r in rows if r["turn"] > 0]  # first turns share only the system prompt in either setting
    summary = {"rss_ready": rss_ready, "rss_end": rss_end,
               "prompt_tokens_after_first_turn": sum(r["prompt_tokens"] for r in later),
               "cached_tokens_after_first_turn": sum(r["cached_tokens"] for r in later),
               "prefilled_tokens_after_first_turn": sum(r["prompt_tokens"] - r["cached_tokens"] for r in later),
               "ttft_ms_p50_after_first_turn": percentile([r["ttft_ms"] for r in later], 50)}
    return rows, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m-instruct")
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serve_sessions.json")
    args = parser.parse_args()
    recorder = Recorder("bench_serve_sessions", parameters=vars(args))
    samples, summary, rows = {}, {}, []
    for sessions in (1, args.conversations):
        samples[sessions], summary[sessions] = run_setting(sessions, args)
        s = summary[sessions]
        rows.append([sessions, f"{s['cached_tokens_after_first_turn']} / {s['prompt_tokens_after_first_turn']}",
                     s["prefilled_tokens_after_first_turn"], s["ttft_ms_p50_after_first_turn"],
                     s["rss_end"]["rss_mb"]])
    extra = summary[args.conversations]["rss_end"]["rss_mb"] - summary[1]["rss_end"]["rss_mb"]
    summary["rss_mb_per_extra_session"] = round(extra / max(1, args.conversations - 1), 1)
    table = Table(["--sessions", "cached / prompt tokens (turns 2+)", "tokens prefilled", "TTFT p50 ms (turns 2+)",
                   "server RSS MB"], rows,
                  caption=f"{args.conversations} interleaved conversations x {args.turns} turns")
    path = recorder.write(args.out, samples=samples, summary=summary, table=table,
                          extra_versions=("starlette", "uvicorn"))
    print(table.markdown())
    print(f"RSS per extra session: {summary['rss_mb_per_extra_session']} MB; wrote {path}")


if __name__ == "__main__":
    main()
