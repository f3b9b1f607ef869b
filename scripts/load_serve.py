#!/usr/bin/env python
"""Load test of `edgellm serve` on loopback: N concurrent clients x M requests, bounded in count and time.

Starts `edgellm serve` on 127.0.0.1 (a free port), waits for /health, notes the server's RSS, then runs
--clients threads, each holding its own multi-turn conversation (a shared system prompt, its own turns)
and sending --requests requests: even ones streamed, odd ones not; every --deadline-every-th with an
X-Edgellm-Deadline-Ms header. A client that gets a 503 moves on after its Retry-After (capped at 2 s).
Pass criteria: every request ends complete, as a deadline fallback with finish_reason "deadline", or a
503 with Retry-After — none lost, none hung (per-request timeout). Reports p50/p99 TTFT (streamed
requests, queue wait included), throughput, the server's RSS before/after and its /metrics counters,
and writes the results file (edgellm.record) with every sample.

    python scripts/load_serve.py --model .cache/models/smollm2-135m-instruct --out benchmarks/serve_load.json
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx2 as httpx

from serve_client import QUESTIONS, SYSTEM, Sample, chat, env_with_repo, percentile, rss_mb, wait_ready

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgellm.record import Recorder, Table  # noqa: E402

URL_LINE = re.compile(r"at (http://\S+)/v1")


def start_server(model: Path, args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edgellm.cli", "serve", "-m", str(model), "--host", "127.0.0.1", "--port", "0",
           "--max-queue", str(args.max_queue), "--sessions", str(args.sessions)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env_with_repo(ROOT))
    for line in process.stdout:
        match = URL_LINE.search(line)
        if match:
            return process, match.group(1)
    raise SystemExit(f"error: the server exited ({process.wait()}) before printing its URL")


def metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("edgellm_") and "{" not in line and "_bucket" not in line:
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def client_loop(url: str, client: int, args, stop_at: float, out: list[Sample], lock: threading.Lock) -> None:
    rng = random.Random(client)
    history: list[dict] = []
    with httpx.Client() as http:
        for index in range(args.requests):
            if time.monotonic() > stop_at:
                break
            question = rng.choice(QUESTIONS)
            if index % 6 == 0:
                history = []  # a new conversation now and then: first turns repeat across clients (cacheable)
            messages = [{"role": "system", "content": SYSTEM}] + history[-4:] + [{"role": "user", "content": question}]
            body = {"model": "edgellm", "messages": messages, "max_tokens": args.max_tokens, "stream": index % 2 == 0}
            if index % 3 == 2:
                body |= {"temperature": 0.7, "seed": rng.randrange(1000)}
            else:
                body["temperature"] = 0
            deadline = args.deadline_ms if args.deadline_every and index % args.deadline_every == args.deadline_every - 1 \
                else None
            sample = chat(http, url, body, client, index, deadline, timeout=args.request_timeout)
            with lock:
                out.append(sample)
            if sample.category == "rejected":
                time.sleep(min(2.0, float(sample.retry_after or 1)))
            elif sample.category in ("complete", "fallback"):
                history += [{"role": "user", "content": question}, {"role": "assistant", "content": sample.text}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m-instruct")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=25, help="Per client.")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-queue", type=int, default=8, help="Server's --max-queue (below --clients: some 503s).")
    parser.add_argument("--sessions", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--deadline-every", type=int, default=5, help="Every k-th request of a client has a deadline.")
    parser.add_argument("--deadline-ms", type=float, default=10000)
    parser.add_argument("--request-timeout", type=float, default=180, help="A request not done by then is 'hung'.")
    parser.add_argument("--time-limit", type=float, default=1500, help="No new requests after this many seconds.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serve_load.json")
    args = parser.parse_args()
    if args.clients > 64 or args.requests > 200:
        raise SystemExit("error: at most 64 clients x 200 requests (a bounded load test, not a flood).")

    recorder = Recorder("load_serve", parameters=vars(args))
    process, url = start_server(args.model, args)
    samples: list[Sample] = []
    try:
        wait_ready(url, process)
        rss_before = rss_mb(process.pid)
        lock = threading.Lock()
        started = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(url, c, args, started + args.time_limit, samples, lock))
                   for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.time_limit + args.request_timeout + 30)
        wall = time.monotonic() - started
        hung_threads = sum(t.is_alive() for t in threads)
        rss_after = rss_mb(process.pid)
        server_metrics = metrics(url)
    finally:
        process.send_signal(2)  # SIGINT: the server's clean shutdown
        try:
            exit_code = process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            exit_code = process.wait()

    planned = args.clients * args.requests
    counts = {c: sum(s.category == c for s in samples) for c in ("complete", "fallback", "rejected", "error")}
    ttft = [s.ttft_ms for s in samples if s.ttft_ms is not None and s.category == "complete"]
    decode = [s.decode_ms_per_token for s in samples if s.decode_ms_per_token]
    tokens = sum(s.completion_tokens or 0 for s in samples if s.category in ("complete", "fallback"))
    summary = {
        "planned": planned, "answered": len(samples), "not_sent_time_limit": planned - len(samples),
        "hung_clients": hung_threads, **counts,
        "fallbacks_with_reason_deadline": sum(s.finish_reason == "deadline" for s in samples),
        "response_cache_hits": sum(s.response_cache == "hit" for s in samples),
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "decode_ms_per_token_p50": percentile(decode, 50), "wall_s": round(wall, 1),
        "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "answers_per_s": round((counts["complete"] + counts["fallback"]) / wall, 3),
        "rss_before": rss_before, "rss_after": rss_after, "server_exit_code": exit_code,
        "server_metrics": server_metrics,
    }
    ok = counts["error"] == 0 and hung_threads == 0 and len(samples) == planned and exit_code == 0
    summary["passed"] = ok
    table = Table(["clients x requests", "complete", "deadline fallback", "503 + Retry-After", "lost/hung/error",
                   "TTFT p50 ms", "TTFT p99 ms", "tokens/s", "RSS before → after MB"],
                  [[f"{args.clients} x {args.requests}", counts["complete"], counts["fallback"], counts["rejected"],
                    counts["error"] + hung_threads + planned - len(samples), summary["ttft_ms_p50"],
                    summary["ttft_ms_p99"], summary["tokens_per_s"],
                    f"{rss_before['rss_mb']:.0f} → {rss_after['rss_mb']:.0f}"]])
    path = recorder.write(args.out, samples=[asdict(s) for s in samples], summary=summary, table=table,
                          notes="TTFT: streamed, complete requests, client side, queue wait included.",
                          extra_versions=("starlette", "uvicorn", "prometheus-client", "httpx2"))
    print(table.markdown())
    print(f"wrote {path}; {'PASSED' if ok else 'FAILED'}: {summary['answered']}/{planned} answered, "
          f"errors {counts['error']}, hung clients {hung_threads}")
    for s in samples:
        if s.category == "error":
            print(f"  error: client {s.client} request {s.index}: {s.error}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
