"""A real `edgellm serve` process on 127.0.0.1 (a free port) per server configuration, on the tiny model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
URL_LINE = re.compile(r"at (http://\S+)/v1")


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    first_lines: list[str]

    def client(self, api_key: str = "none", **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics without labels, e.g. {'edgellm_response_cache_hits_total': 1.0}."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(model_dir: Path, *args: str, timeout: float = 60) -> Server:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("EDGELLM_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "serve", "-m", str(model_dir), "--port", "0",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    url = None
    while url is None:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError("the server exited before it listened:\n" + "".join(lines))
        lines.append(line)
        match = URL_LINE.search(line)
        url = match.group(1) if match else None
        if time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the server did not print its URL in time:\n" + "".join(lines))
    lines.append(process.stdout.readline())  # the curl example
    while time.monotonic() < deadline:  # ready = loaded and warmed
        if httpx.get(url + "/health", timeout=5).status_code == 200:
            return Server(url, process, lines)
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("the server never became ready")


@pytest.fixture(scope="module")
def server(tiny_fp32_dir):
    """Default settings (response cache on, no key)."""
    s = start_server(tiny_fp32_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict_server(tiny_fp32_dir):
    """A key, CORS for one origin, small limits, no response cache, a queue of one."""
    s = start_server(tiny_fp32_dir, "--api-key", "sesame", "--cors-origin", "http://kiosk.local",
                     "--max-body-bytes", "4096", "--max-prompt-tokens", "64", "--no-response-cache",
                     "--max-queue", "1")
    yield s
    s.stop()
