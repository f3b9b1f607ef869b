"""Public value types of the runtime: settings in, results out."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Literal

from ..errors import InvalidParameterError

FinishReason = Literal["stop", "length", "deadline", "cancelled"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. None means "the model's default" (from its manifest).

    temperature 0 is greedy decoding; seed makes sampling repeatable; stop strings end the
    reply and are never part of it.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always make max_new_tokens tokens

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        _check(self.max_new_tokens is None or (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1),
               "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.temperature is None or (math.isfinite(self.temperature) and self.temperature >= 0),
               "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        _check(self.top_k is None or (isinstance(self.top_k, int) and self.top_k >= 1),
               "top_k", self.top_k, "an integer >= 1 (or None for no limit)")
        _check(self.top_p is None or (0 < self.top_p <= 1), "top_p", self.top_p, "in (0, 1]")
        _check(self.repetition_penalty is None or (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0),
               "repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop, "non-empty strings")


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise InvalidParameterError(f"{name}={value!r} is out of range: it must be {allowed}. Fix: pass a value in that range.")


class CancelToken:
    """Thread-safe stop switch: another thread calls cancel(); generation ends within one model step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class GenerationTimings:
    """Milliseconds, measured around the model calls (tokenization included in prefill_ms)."""

    prompt_tokens: int
    cached_tokens: int
    prefill_ms: float
    ttft_ms: float
    decode_ms_per_token: float
    generated_tokens: int
    total_ms: float

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms_per_token if self.decode_ms_per_token > 0 else 0.0


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    timings: GenerationTimings


@dataclass(frozen=True)
class StreamChunk:
    """New text since the last chunk (always whole UTF-8 characters) and the tokens that made it."""

    text: str
    token_ids: tuple[int, ...] = field(default=())
