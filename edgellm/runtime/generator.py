"""The hot loop: reuse cached prefix → prefill the rest in chunks → sample (under a constraint's mask, if
any) → stop check → step.

Everything that generates text (LLM.generate/stream, the CLI, the voice demo) runs through
`Stream`. Cancel and deadline are checked before every model call, so they act within one
step, during prefill too.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator, Sequence

from tokenizers import Tokenizer

from .constraint import Constraint
from .sampling import ResolvedSampling, Sampler
from .session import DecoderSession
from .text import IncrementalDecoder, StopMatcher
from .types import CancelToken, FinishReason, GenerationResult, GenerationTimings, StreamChunk

PREFILL_CHUNK = 64  # tokens per prefill call: big enough for efficient GEMMs, small enough to cancel in ~0.1 s


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefill(session: DecoderSession, prompt: Sequence[int], should_stop=None, chunk: int = PREFILL_CHUNK):
    """Make the cache hold exactly `prompt`, re-using the longest cached prefix.

    Returns (logits of the last prompt token or None if stopped, tokens reused from the cache).
    The last prompt token is always recomputed, because the logits after it are not kept.
    """
    reused = min(common_prefix_length(session.tokens, prompt), len(prompt) - 1)
    session.truncate(reused)
    logits = None
    for start in range(reused, len(prompt), chunk):
        if should_stop is not None and should_stop():
            return None, reused
        logits = session.forward(prompt[start:start + chunk], keep=1)[-1]
    return logits, reused


class _Outcome:
    """What the generator shares with its Stream: the result, and a weak link back (never a strong one, so an
    abandoned Stream is freed at once and its generator's `finally` gives the model back)."""

    __slots__ = ("result", "stream", "__weakref__")

    def __init__(self) -> None:
        self.result: GenerationResult | None = None
        self.stream = None


Acquire = Callable[[_Outcome, Callable[[], bool]], "tuple[DecoderSession, Callable[[], None]] | None"]


class Stream:
    """Iterator of StreamChunk; `result` holds the GenerationResult once iteration ends.

    The model is taken at the first next(), not when the stream is made: a stream that is never iterated
    holds nothing, and one dropped half-way gives the model back as soon as it is garbage (or on close()).
    """

    def __init__(self, acquire: Acquire, tokenizer: Tokenizer, prompt: list[int], settings: ResolvedSampling,
                 eos_token_ids: frozenset[int], deadline: float | None, cancel: CancelToken | None,
                 started: float, constraint: Constraint | None = None, finish=None) -> None:
        """acquire(outcome, should_stop): wait for the model; returns (session, release), or None if should_stop()
        became true first. constraint: the reply's grammar state (json_schema / regex / grammar); finish:
        GenerationResult -> GenerationResult, applied once at the end (tool calls parsed from the text)."""
        self._outcome = _Outcome()
        self._outcome.stream = weakref.ref(self)
        self.constraint = constraint
        self._iterator = _run(self._outcome, acquire, tokenizer, prompt, settings, eos_token_ids, deadline, cancel,
                              started, constraint, finish)

    @property
    def result(self) -> GenerationResult | None:
        return self._outcome.result

    def __iter__(self) -> Iterator[StreamChunk]:
        return self

    def __next__(self) -> StreamChunk:
        return next(self._iterator)

    def close(self) -> None:
        """Stop early and give the model back (a stream that never started holds nothing)."""
        self._iterator.close()


def _run(outcome: _Outcome, acquire: Acquire, tokenizer, prompt, settings, eos_ids, deadline, cancel,
         started, constraint: Constraint | None = None, finish=None) -> Iterator[StreamChunk]:
    deadline_at = started + deadline if deadline is not None else None
    reason: FinishReason | None = None

    def should_stop() -> bool:
        nonlocal reason
        if cancel is not None and cancel.cancelled:
            reason = "cancelled"
        elif deadline_at is not None and time.perf_counter() >= deadline_at:
            reason = "deadline"
        return reason is not None

    generated: list[int] = []
    text_parts: list[str] = []
    first_token_at = prefill_done = None
    decode_steps = emitted = 0
    reused = 0
    stopped_by_string = False
    session = None
    taken = acquire(outcome, should_stop)  # waiting for the model counts against the deadline, and cancel stops it
    release = taken[1] if taken is not None else None
    try:
        if taken is not None:
            session = taken[0]
            sampler = Sampler(settings)
            decoder = IncrementalDecoder(tokenizer, context=prompt)
            stops = StopMatcher(settings.stop)
            if constraint is not None and hasattr(session, "draft_filter"):
                session.draft_filter = constraint.guide_drafts  # speculative: drafts follow the grammar
            logits, reused = prefill(session, prompt, should_stop)
            prefill_done = time.perf_counter()
            budget = min(settings.max_new_tokens, session.capacity - len(prompt) + 1)
            while logits is not None:
                allowed = constraint.allowed() if constraint is not None else None
                token = sampler(logits, prompt + generated if settings.repetition_penalty else generated, allowed)
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                if token in eos_ids:
                    reason = "stop"
                    break
                generated.append(token)
                if constraint is not None:
                    constraint.advance(token)
                text, hit = stops.feed(decoder.add(token))
                if text:
                    text_parts.append(text)
                    yield StreamChunk(text, tuple(generated[emitted:]))
                    emitted = len(generated)
                if hit:
                    reason = "stop"
                    stopped_by_string = True
                    break
                if constraint is not None and constraint.complete:
                    reason = "stop"  # the grammar is complete: nothing but EOS could follow
                    break
                if len(generated) >= budget:
                    reason = "length"
                    break
                if should_stop():
                    break
                logits = session.forward((token,), keep=1)[0]
                decode_steps += 1
            if not stopped_by_string:
                tail = stops.feed(decoder.flush())[0] + stops.flush()
                if tail or emitted < len(generated):
                    text_parts.append(tail)
                    yield StreamChunk(tail, tuple(generated[emitted:]))
    finally:
        try:
            if constraint is not None and hasattr(session, "draft_filter"):
                session.draft_filter = None
            end = time.perf_counter()
            prefill_done = prefill_done or end
            first = first_token_at or end
            outcome.result = GenerationResult(
                text="".join(text_parts),
                token_ids=tuple(generated),
                finish_reason=reason or "cancelled",
                timings=GenerationTimings(
                    prompt_tokens=len(prompt), cached_tokens=reused,
                    prefill_ms=(prefill_done - started) * 1000, ttft_ms=(first - started) * 1000,
                    decode_ms_per_token=(end - first) * 1000 / decode_steps if decode_steps else 0.0,
                    generated_tokens=len(generated), total_ms=(end - started) * 1000,
                ),
            )
            if finish is not None:
                outcome.result = finish(outcome.result)
        finally:
            if release is not None:
                release()
