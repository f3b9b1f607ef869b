"""`edgellm chat` as a user drives it: Ctrl-C mid-answer, closed stdin, errors as one line (real subprocesses)."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True, env=_env(),
                          timeout=120, **kwargs)


class _Reader:
    """Collects a pipe's bytes in a thread, so the test can wait for text without blocking on the pipe."""

    def __init__(self, pipe) -> None:
        self.text = ""
        self._chunks: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(pipe,), daemon=True).start()

    def _pump(self, pipe) -> None:
        for chunk in iter(lambda: os.read(pipe.fileno(), 4096), b""):
            self._chunks.put(chunk.decode("utf-8", "replace"))

    def wait_for(self, predicate, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while not predicate(self.text):
            if time.monotonic() > end:
                raise AssertionError(f"timed out; got so far: {self.text[-2000:]!r}")
            try:
                self.text += self._chunks.get(timeout=0.05)
            except queue.Empty:
                pass
        return self.text


def test_ctrl_c_mid_answer_cancels_it_and_the_chat_goes_on(tiny_int8_dir):
    """The tiny model decodes ~1,800 greedy tokens without an end token, so SIGINT lands mid-answer."""
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "chat", "-m", str(tiny_int8_dir),
                             "--max-new-tokens", "1800"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_env())
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    try:
        err.wait_for(lambda t: "edgellm chat" in t)
        proc.stdin.write(b"Write a very long story about dragons.\n")
        proc.stdin.flush()
        out.wait_for(lambda t: len(t) > len("you> ") + 20)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        first = err.wait_for(lambda t: t.count("]") >= 1)
        assert "cancelled]" in first, first
        tokens = int(first.split("[")[1].split(" tokens")[0])
        assert 0 < tokens < 1800
        proc.stdin.write(b"What is 2 plus 2?\n")
        proc.stdin.flush()
        second = err.wait_for(lambda t: t.count("]") >= 2)
        assert second.rstrip().endswith(("length]", "stop]")), second
        assert int(second.split("[")[2].split(" tokens")[0]) > 0  # the second question was answered
        proc.stdin.write(b"/quit\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err.wait_for(lambda t: True)
    assert "Traceback" not in err.text and "KeyError" not in err.text and "terminate called" not in err.text


def test_chat_with_stdin_closed_is_one_line(tiny_int8_dir):
    result = subprocess.run([sys.executable, "-m", "edgellm.cli", "chat", "-m", str(tiny_int8_dir)],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, env=_env(), timeout=120,
                            pass_fds=(), preexec_fn=lambda: os.close(0))
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("error: chat reads questions from stdin, which is closed")
    assert result.stderr.count("\n") == 1


def test_chat_with_empty_stdin_leaves_cleanly(tiny_int8_dir):
    result = _cli("chat", "-m", str(tiny_int8_dir), stdin=subprocess.DEVNULL)
    assert result.returncode == 0 and "Traceback" not in result.stderr


def test_chat_error_mid_session_is_one_line_and_the_session_goes_on(tiny_int8_dir):
    """A question too long for the context fails as one line; the next question is answered."""
    long_question = "word " * 3000
    result = _cli("chat", "-m", str(tiny_int8_dir), "--max-new-tokens", "4",
                  input=f"{long_question}\nhello\n/quit\n")
    assert result.returncode == 0, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "the context window holds 2048" in errors[0]
    assert result.stderr.count(" tokens, TTFT") == 1  # the second question got its answer


# (case, CLI arguments, fragment of the one-line error)
CLI_CASES = [
    ("bad temperature", ["generate", "hi", "--temperature", "-1"], "temperature=-1.0 is out of range"),
    ("stop as empty string", ["generate", "hi", "--stop", ""], "stop=('',)"),
    ("deadline zero", ["generate", "hi", "--deadline", "0"], "deadline=0.0"),
    ("missing model folder", ["generate", "hi", "-m", "/nonexistent/model"], "does not exist"),
    ("unparsable number", ["generate", "hi", "--temperature", "abc"], "Invalid value for '--temperature'"),
    ("bench with no runs", ["bench", "--runs", "0"], "0 is not in the range x>=1"),
    ("unknown option", ["chat", "--nosuch"], "No such option '--nosuch'"),
    ("lone surrogate in argv", ["generate", "caf\udce9", "--max-new-tokens", "2"], "has a lone surrogate"),
]


def test_cli_errors_are_one_line(tiny_int8_dir):
    for case, args, fragment in CLI_CASES:
        if "-m" not in args:
            args = args + ["-m", str(tiny_int8_dir)]
        result = _cli(*args)
        assert result.returncode == 1, (case, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (case, result.stderr)
        assert fragment in result.stderr, (case, result.stderr)
