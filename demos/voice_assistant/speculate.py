"""Speculative start: begin the reply at a pause that sounds final, before the turn has really ended.

The reply is generated on a background thread into a buffer (nothing is shown or spoken). When the
turn then ends with the same words, the buffered tokens are shown at once and generation goes on;
when the user goes on speaking (or the recognizer's final differs), the generation is cancelled
within one model step, and the next prefill rolls the KV cache back to the longest common prefix.
Greedy decoding from an equal cache state gives equal tokens, so a reply after a rollback equals,
token for token, the reply that was never speculated (tests/voice/test_speculate.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger(__name__)

_END = object()


class Speculation:
    """One background generation for `user` (the words heard so far) from `messages`."""

    def __init__(self, llm: Any, messages: list[dict[str, str]], user: str, params: Any, ahead: int = 8) -> None:
        """ahead: tokens made before the turn is confirmed; then the thread waits (take() or cancel()), so a
        guess does not take CPU from the audio loop while the end of the turn is still being decided."""
        import edgellm

        self.user, self.messages = user, messages
        self.started = time.perf_counter()
        self.first_token_at: float | None = None  # when the first token was ready (in the background)
        self.tokens = 0
        self.result: Any = None  # the GenerationResult, once the generation ended
        self.error: BaseException | None = None
        self._cancel = edgellm.CancelToken()
        self._ahead = ahead
        self._go = threading.Event()  # set by take() (the turn ended as guessed) or cancel()
        self._chunks: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(llm, params), name="speculate", daemon=True)
        self._thread.start()

    def _run(self, llm: Any, params: Any) -> None:
        stream = None
        try:
            stream = llm.stream(self.messages, params=params, cancel=self._cancel)
            for chunk in stream:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.tokens += len(chunk.token_ids)
                self._chunks.put(chunk)
                if self.tokens >= self._ahead:
                    self._go.wait()
        except Exception as exc:  # reported to whoever takes the reply
            logger.error("speculative generation failed: %s", exc)
            self.error = exc
        finally:
            if stream is not None:
                self.result = stream.result
            self._chunks.put(_END)

    def cancel(self) -> None:
        """Stop generating and wait until the model is free again (one model step at most)."""
        self._cancel.cancel()
        self._go.set()
        self._thread.join()

    def take(self) -> Iterator[Any]:
        """The reply's StreamChunks: those already made at once, then the rest as they come."""
        self._go.set()
        while (chunk := self._chunks.get()) is not _END:
            yield chunk
        self._thread.join()
        if self.error is not None:
            raise self.error
