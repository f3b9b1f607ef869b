"""The HTTP client shared by scripts/load_serve.py and scripts/bench_serve_peers.py (stdlib + httpx2).

One request = one POST to an OpenAI-compatible /v1/chat/completions, streamed or not, timed on the
client side: TTFT = request sent → first content delta (streaming only); decode ms/token = (last
delta − first delta) / (completion tokens − 1) from a streamed answer; total = sent → last byte.
Every request ends in one category: complete (finish stop/length), fallback (finish "deadline"),
rejected (a 503 carrying Retry-After), or error (anything else: other status, bad body, timeout).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx2 as httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
SYSTEM = "You are a helpful assistant on a kiosk in a city museum. Answer in one or two short sentences."
QUESTIONS = ["What are the opening hours?", "Where is the cafe?", "How much is a ticket?", "Is there a cloakroom?",
             "Can I take photos?", "Where are the toilets?", "What is the oldest painting here?",
             "Is the museum accessible by wheelchair?", "Do you have audio guides?", "When was the museum built?",
             "What is on the second floor?", "Can children visit for free?"]  # the load and peer scripts' requests


@dataclass
class Sample:
    client: int
    index: int
    stream: bool
    deadline_ms: float | None
    category: str  # complete | fallback | rejected | error
    status: int
    finish_reason: str | None
    ttft_ms: float | None
    total_ms: float
    prompt_tokens: int | None
    completion_tokens: int | None
    cached_tokens: int | None
    decode_ms_per_token: float | None
    retry_after: str | None = None
    response_cache: str | None = None
    error: str | None = None
    text: str = ""


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host not in LOOPBACK and f"[{host}]" not in LOOPBACK:
        raise SystemExit(f"error: {url} is not a loopback address; these scripts only load this machine. "
                         "Fix: use http://127.0.0.1:PORT")


def chat(http: httpx.Client, url: str, body: dict, client: int, index: int, deadline_ms: float | None = None,
         timeout: float = 120.0) -> Sample:
    headers = {"X-Edgellm-Deadline-Ms": str(deadline_ms)} if deadline_ms else {}
    stream = bool(body.get("stream"))
    if stream:
        body = body | {"stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first = last = None
    parts: list[str] = []
    usage = finish = None
    status, retry, cache, error = 0, None, None, None
    try:
        with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout) as resp:
            status, retry, cache = resp.status_code, resp.headers.get("retry-after"), \
                resp.headers.get("x-edgellm-response-cache")
            if status != 200:
                error = resp.read().decode(errors="replace")[:300]
            elif stream:
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        content = (choice.get("delta") or {}).get("content")
                        if content:
                            now = time.perf_counter()
                            first = first or now
                            last = now
                            parts.append(content)
                        finish = choice.get("finish_reason") or finish
            else:
                doc = json.loads(resp.read())
                usage, finish = doc.get("usage"), doc["choices"][0]["finish_reason"]
                parts.append(doc["choices"][0]["message"]["content"] or "")
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    total = (time.perf_counter() - started) * 1000
    tokens = usage.get("completion_tokens") if usage else None
    if tokens is None and stream and error is None:
        tokens = len(parts)  # a server without stream usage: one delta per token (llama.cpp streams so)
    cached = ((usage.get("prompt_tokens_details") or {}).get("cached_tokens") if usage else None)
    decode = (last - first) * 1000 / (tokens - 1) if first and last and tokens and tokens > 1 and last > first else None
    if error is None and finish in ("stop", "length"):
        category = "complete"
    elif error is None and finish == "deadline":
        category = "fallback"
    elif status == 503 and retry:
        category = "rejected"
    else:
        category, error = "error", error or f"status {status}, finish_reason {finish!r}"
    return Sample(client, index, stream, deadline_ms, category, status, finish,
                  (first - started) * 1000 if first else None, total, usage.get("prompt_tokens") if usage else None,
                  tokens, cached, decode, retry, cache, error, "".join(parts))


def rss_mb(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a process, from /proc (MB)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return {"rss_mb": round(values.get("VmRSS", 0), 1), "peak_rss_mb": round(values.get("VmHWM", 0), 1)}


def wait_ready(url: str, process: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise SystemExit(f"error: the server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"error: {url} was not ready within {timeout} s")


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of the values, or None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return round(ordered[rank - 1], 2)


def env_with_repo(repo: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(repo) + os.pathsep + os.environ.get("PYTHONPATH", ""))
