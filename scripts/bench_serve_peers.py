#!/usr/bin/env python
"""Side by side, one run: `edgellm serve` vs llama-cpp-python's OpenAI server on the same model and client.

Manual only (never CI: llama-cpp-python builds llama.cpp for minutes). Needs a venv with
`llama-cpp-python[server]` (scripts/setup_peers.sh makes .venv-peers; pass it as --peer-python).

  ours     python -m edgellm.cli serve -m MODEL (int8 ONNX, converted from the shipped Q4_1 GGUF),
           --no-response-cache so repeated prompts are really generated
  llama    python -m llama_cpp.server --model Q8_0 GGUF (requantized from the same Q4_1, as in
           scripts/bench_peers.py) — llama.cpp's own OpenAI-compatible server in Python, with
           --interrupt_requests False (its default True ends a running stream, without a
           finish_reason, whenever another request arrives; --llama-interrupt keeps that default)

Both on 127.0.0.1, both with --threads, both started once and kept warm. The same client
(scripts/serve_client.py) sends streamed chat requests: one shared system prompt, a different user
question each (both servers reuse the cached system-prompt prefix), --max-tokens tokens with EOS
suppressed (ours: ignore_eos; llama: logit_bias on EOS), greedy. For each concurrency (1 and 4
clients) and round, the servers take turns (order alternating). TTFT = sent → first content delta,
decode ms/token = (last − first delta) / (tokens − 1), per request, client side; medians over all.

    python scripts/bench_serve_peers.py --model .cache/models/smollm2-135m-instruct \\
        --peer-python .venv-peers/bin/python --out benchmarks/serve_peers.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import httpx2 as httpx

from serve_client import QUESTIONS, SYSTEM, Sample, chat, env_with_repo, percentile, rss_mb, wait_ready

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgellm.record import Recorder, Table  # noqa: E402

EOS_TOKEN = 2  # <|im_end|> in SmolLM2's vocabulary (both servers use the same tokenizer)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def q8_gguf(peer_python: str) -> Path:
    """The Q8_0 GGUF that scripts/bench_peers.py makes (made here with its code if missing)."""
    code = ("import sys; sys.path.insert(0, 'scripts'); import bench_peers as b; "
            "q8 = b.CACHE / b.Q8_NAME; b.CACHE.mkdir(parents=True, exist_ok=True); "
            "q8.is_file() or b.make_q8_0(b.q4_1_gguf(), q8, 2); print(q8)")
    out = subprocess.run([peer_python, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"error: could not make the Q8_0 GGUF with {peer_python}:\n{out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def start(name: str, args) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if name == "edgellm":
        cmd = [sys.executable, "-m", "edgellm.cli", "serve", "-m", str(args.model), "--port", str(port),
               "--no-response-cache", "--max-queue", "64"] + (["--threads", str(args.threads)] if args.threads else [])
    else:
        cmd = [args.peer_python, "-m", "llama_cpp.server", "--model", str(args.gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", "2048", "--interrupt_requests", str(args.llama_interrupt)] \
            + (["--n_threads", str(args.threads)] if args.threads else [])
    log = open(Path(tempfile.gettempdir()) / f"bench_serve_peers.{name}.log", "w")  # llama.cpp logs a lot: no pipe
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env_with_repo(ROOT))
    url = f"http://127.0.0.1:{port}"
    if name == "edgellm":
        wait_ready(url, process)
    else:  # llama_cpp.server has no /health: wait for /v1/models
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"error: llama_cpp.server exited; see {log.name}")
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"error: llama_cpp.server did not start in 300 s; see {log.name}")
            time.sleep(0.3)
    return process, url


def batch(url: str, clients: int, per_client: int, args, tag: dict, counter: list[int]) -> list[Sample]:
    out: list[Sample] = []
    lock = threading.Lock()

    def run(client: int) -> None:
        with httpx.Client() as http:
            for i in range(per_client):
                with lock:
                    n = counter[0]
                    counter[0] += 1
                body = {"model": "m", "stream": True, "max_tokens": args.max_tokens, "temperature": 0,
                        "messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": QUESTIONS[n % len(QUESTIONS)]}],
                        "ignore_eos": True, "logit_bias": {str(EOS_TOKEN): -100}}
                sample = chat(http, url, body, client, i, timeout=300)
                with lock:
                    out.append(sample)

    threads = [threading.Thread(target=run, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / ".cache" / "models" / "smollm2-135m-instruct")
    parser.add_argument("--peer-python", default=str(ROOT / ".venv-peers" / "bin" / "python"))
    parser.add_argument("--gguf", type=Path, default=None, help="Default: the Q8_0 that bench_peers.py makes.")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2, help="Per client per round.")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--llama-interrupt", action="store_true",
                        help="Keep llama_cpp.server's default interrupt_requests=True: a new request cuts off the "
                             "stream in progress (off here, so it queues requests as edgellm serve does).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serve_peers.json")
    args = parser.parse_args()
    args.gguf = args.gguf or q8_gguf(args.peer_python)
    recorder = Recorder("bench_serve_peers", parameters=vars(args))
    servers = {}
    samples: dict[str, list[dict]] = {}
    rss = {}
    try:
        for name in ("edgellm", "llama-cpp-python"):
            servers[name] = start(name, args)
        counter = [0]
        for name, (_, url) in servers.items():  # warm-up: one request each
            batch(url, 1, 2, args, {}, counter)
        for c in args.concurrency:
            for r in range(args.rounds):
                order = list(servers) if r % 2 == 0 else list(reversed(servers))
                for name in order:
                    counter = [r * 100]  # the same questions for both servers in a round
                    got = batch(servers[name][1], c, args.requests, args, {}, counter)
                    samples.setdefault(f"{name}@{c}", []).extend(asdict(s) | {"round": r} for s in got)
        for name, (process, _) in servers.items():
            rss[name] = rss_mb(process.pid)
    finally:
        for process, _ in servers.values():
            process.send_signal(2)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    summary, rows = {}, []
    for key, rows_ in samples.items():
        name, c = key.split("@")
        ok = [s for s in rows_ if s["category"] == "complete"]
        ttft = percentile([s["ttft_ms"] for s in ok if s["ttft_ms"]], 50)
        decode = percentile([s["decode_ms_per_token"] for s in ok if s["decode_ms_per_token"]], 50)
        tokens = [s["completion_tokens"] for s in ok]
        summary[key] = {"requests": len(rows_), "complete": len(ok), "ttft_ms_p50": ttft,
                        "ttft_ms_p90": percentile([s["ttft_ms"] for s in ok if s["ttft_ms"]], 90),
                        "decode_ms_per_token_p50": decode, "tokens_min_max": [min(tokens, default=0),
                                                                               max(tokens, default=0)]}
        rows.append([name, int(c), len(ok), ttft, decode])
    rows.sort(key=lambda r: (r[1], r[0]))
    for c in args.concurrency:
        ours, peer = summary.get(f"edgellm@{c}"), summary.get(f"llama-cpp-python@{c}")
        if ours and peer and ours["ttft_ms_p50"] and peer["ttft_ms_p50"]:
            summary[f"ratio@{c}"] = {"ttft_llama_over_ours": round(peer["ttft_ms_p50"] / ours["ttft_ms_p50"], 2),
                                     "decode_llama_over_ours": round(peer["decode_ms_per_token_p50"]
                                                                     / ours["decode_ms_per_token_p50"], 2)}
    summary["rss_after"] = rss
    table = Table(["server", "clients", "requests", "TTFT p50 ms", "decode ms/token p50"], rows)
    path = recorder.write(args.out, samples=samples, summary=summary, table=table,
                          notes="Client-side timings of streamed chat requests; servers interleaved per round.",
                          extra_versions=("starlette", "uvicorn", "httpx2"))
    print(table.markdown())
    print({k: v for k, v in summary.items() if k.startswith("ratio")})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
