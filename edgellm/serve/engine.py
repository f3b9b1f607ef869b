"""The scheduler between HTTP handlers (asyncio) and the model (one worker thread).

One model, one generation at a time (two cores gain nothing from two at once). Requests wait in a
bounded first-come-first-served queue; a full queue is refused at once (503 + Retry-After) rather
than left to time out. The worker runs each request through `LLM.stream()` — the runtime's one
generation loop — and hands text back to the request's event loop as it comes. A request whose
client has gone is cancelled with its CancelToken: while queued it is skipped, while running the
runtime stops within one model step.

Prefix cache: the runtime reuses the longest cached prefix by itself; with `--sessions N` a pool of N
models (pool.py) keeps N interleaved conversations cached (the README's Server section has the cost).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import ContextLengthError, EdgeLLMError
from ..runtime import CancelToken, SamplingParams
from ..runtime.sampling import ResolvedSampling
from .cache import CachedAnswer, ResponseCache, cache_key, is_deterministic
from .metrics import Metrics
from .pool import SessionPool
from .schema import GenerationRequest, RequestError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = 16  # requests waiting for the model (the running one not counted)
    deadline_ms: float | None = None  # server default deadline; a request's X-Edgellm-Deadline-Ms overrides it
    fallback_text: str = "Sorry, I ran out of time to answer that."
    response_cache: bool = True
    response_cache_entries: int = 256
    response_cache_bytes: int = 8 * 2**20
    max_prompt_tokens: int | None = None  # default: the context window minus one


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    def to_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(frozen=True)
class Outcome:
    """How a request ended: its whole text (fallback included), the finish reason and exact usage."""

    text: str
    finish_reason: str  # stop | length | deadline | cancelled | shutdown
    usage: Usage
    response_cache: str  # hit | miss | off (not cacheable, or the cache is off)


@dataclass(frozen=True)
class Prepared:
    """A request tokenized and resolved, ready to queue."""

    request: GenerationRequest
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    settings: ResolvedSampling
    cache_key: str | None


@dataclass
class Job:
    prepared: Prepared
    deadline_at: float | None  # time.perf_counter() value
    arrived: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) | ("done", Outcome)
    cancel: CancelToken = field(default_factory=CancelToken)
    first_text_at: float | None = None

    def emit(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
            pass


class Engine:
    def __init__(self, pool: SessionPool, config: EngineConfig, metrics: Metrics, model_id: str) -> None:
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self.model_id = model_id
        self.cache = ResponseCache(config.response_cache_entries, config.response_cache_bytes) \
            if config.response_cache else None
        self.max_prompt_tokens = min(config.max_prompt_tokens or 10**9, pool.first.context_length - 1)
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running: Job | None = None
        self._stopping = False
        self._ready = threading.Event()
        self._mean_job_s = 1.0  # running mean of job time, for Retry-After
        self._worker = threading.Thread(target=self._work, name="edgellm-serve-worker", daemon=True)

    # -- life cycle ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._worker.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def shutdown(self) -> None:
        """Stop taking work; end the running and queued requests now (each gets its final event)."""
        with self._cond:
            self._stopping = True
            jobs = list(self._queue) + ([self._running] if self._running else [])
            self._cond.notify_all()
        for job in jobs:
            job.cancel.cancel()

    def join(self, timeout: float | None = None) -> None:
        self._worker.join(timeout)

    # -- called from request handlers --------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> Prepared:
        """Tokenize and resolve (in a thread: a long prompt takes a while); errors become 400s."""
        llm = self.pool.first
        try:
            params = request.sampling()
            prompt = list(request.prompt) if isinstance(request.prompt, tuple) else request.prompt
            if request.structured is not None and request.kind == "chat":
                prompt = request.structured.messages(request.prompt)  # tools described in the system message
            ids = llm.encode(prompt)
            if params.constraint:  # compiled (and cached) now: a bad schema is this request's 400
                try:
                    llm.grammars.compile(*params.constraint)
                except EdgeLLMError as exc:
                    raise RequestError(str(exc), param=request.structured.param) from exc
        except ContextLengthError as exc:
            raise RequestError(str(exc), param="messages" if request.kind == "chat" else "prompt",
                               code="context_length_exceeded") from exc
        except EdgeLLMError as exc:
            raise RequestError(str(exc), param="messages" if request.kind == "chat" else "prompt") from exc
        vocab = llm.session.vocab_size
        if request.kind == "completion" and isinstance(request.prompt, tuple) and not all(0 <= t < vocab for t in ids):
            raise RequestError(f"'prompt' has token ids outside the vocabulary (0..{vocab - 1}).", param="prompt",
                               code="invalid_value")
        if len(ids) > self.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {len(ids)} tokens; this server takes at most {self.max_prompt_tokens}. "
                "Fix: shorten the prompt (or start the server with a larger --max-prompt-tokens / --context-length).",
                param="messages" if request.kind == "chat" else "prompt", code="context_length_exceeded")
        settings = llm.resolve(params)
        key = None
        if self.cache is not None and is_deterministic(settings):
            key = cache_key(self.model_id, ids, settings)
        return Prepared(request, tuple(ids), params, settings, key)

    def cached(self, prepared: Prepared) -> Outcome | None:
        if prepared.cache_key is None or self.cache is None:
            return None
        answer = self.cache.get(prepared.cache_key)
        if answer is None:
            self.metrics.response_cache_misses.inc()
            return None
        self.metrics.response_cache_hits.inc()
        n = len(prepared.prompt_ids)
        return Outcome(answer.text, answer.finish_reason, Usage(n, answer.completion_tokens, n), "hit")

    def submit(self, prepared: Prepared, deadline_ms: float | None) -> Job:
        """Queue a request, or raise RequestError 503 when the queue is full or the server is stopping."""
        now = time.perf_counter()
        deadline_ms = deadline_ms if deadline_ms is not None else self.config.deadline_ms
        job = Job(prepared, now + deadline_ms / 1000 if deadline_ms else None, now, asyncio.get_running_loop())
        with self._cond:
            if self._stopping:
                raise RequestError("the server is shutting down.", status=503, code="shutting_down",
                                   kind="server_error")
            if len(self._queue) >= self.config.max_queue:
                self.metrics.rejected.inc()
                retry = max(1, round(self._mean_job_s * (len(self._queue) + 1)))
                raise RequestError(
                    f"the server is busy: {len(self._queue)} requests are waiting (the limit is "
                    f"{self.config.max_queue}). Fix: retry after {retry} s.", status=503, code="queue_full",
                    kind="server_error", headers={"Retry-After": str(retry)})
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify()
        return job

    # -- the worker thread -------------------------------------------------------------------------------------

    def _work(self) -> None:
        self._warm_up()
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return  # stopping and nothing left
                job = self._queue.popleft()
                self._running = job
                self.metrics.queue_depth.set(len(self._queue))
            if self._stopping:
                job.cancel.cancel()
            started = time.perf_counter()
            self.metrics.running.set(1)
            try:
                self._run(job)
            except Exception as exc:  # noqa: BLE001 - the worker must survive any one request
                logger.exception("request failed")
                job.emit("error", RequestError(f"generation failed: {exc}", status=500, kind="server_error"))
            finally:
                self.metrics.running.set(0)
                with self._cond:
                    self._running = None
                self._mean_job_s = 0.8 * self._mean_job_s + 0.2 * (time.perf_counter() - started)

    def _warm_up(self) -> None:
        self.pool.warm_up()
        self._ready.set()
        self.metrics.ready.set(1)
        logger.info("model warmed up; ready")

    def _run(self, job: Job) -> None:
        p = job.prepared
        wait = time.perf_counter() - job.arrived
        self.metrics.queue_wait.observe(wait)
        if job.cancel.cancelled:
            self._finish(job, "", "shutdown" if self._stopping else "cancelled", 0, 0)
            return
        remaining = None if job.deadline_at is None else job.deadline_at - time.perf_counter()
        if remaining is not None and remaining <= 0:
            self._finish(job, "", "deadline", 0, 0)
            return
        stream = self.pool.take(p.prompt_ids).stream(list(p.prompt_ids), p.params, deadline=remaining, cancel=job.cancel)
        parts: list[str] = []
        try:
            for chunk in stream:
                if chunk.text:
                    if job.first_text_at is None:
                        job.first_text_at = time.perf_counter()
                        self.metrics.ttft.observe(job.first_text_at - job.arrived)
                    parts.append(chunk.text)
                    job.emit("text", chunk.text)
        finally:
            stream.close()
        result = stream.result
        t = result.timings
        self.metrics.prompt_tokens.inc(t.prompt_tokens)
        self.metrics.generated_tokens.inc(t.generated_tokens)
        if t.cached_tokens:
            self.metrics.prefix_cache_hits.inc()
            self.metrics.prefix_cached_tokens.inc(t.cached_tokens)
        if t.decode_ms_per_token:
            self.metrics.decode_ms.observe(t.decode_ms_per_token)
        reason = result.finish_reason
        if reason == "cancelled" and self._stopping:
            reason = "shutdown"
        text = "".join(parts)
        if reason in ("stop", "length") and p.cache_key is not None and self.cache is not None:
            self.cache.put(p.cache_key, CachedAnswer(text, len(result.token_ids), reason))
            self.metrics.response_cache_entries.set(len(self.cache))
            self.metrics.response_cache_bytes.set(self.cache.bytes)
        self._finish(job, text, reason, len(result.token_ids), t.cached_tokens)

    def _finish(self, job: Job, text: str, reason: str, completion_tokens: int, cached_tokens: int) -> None:
        if reason == "deadline":
            self.metrics.deadline_fallbacks.inc()
            fallback = self.config.fallback_text
            if fallback:
                if text and not text[-1].isspace():
                    fallback = " " + fallback
                text += fallback
                if job.first_text_at is None:
                    job.first_text_at = time.perf_counter()
                job.emit("text", fallback)
        elif reason in ("cancelled", "shutdown"):
            self.metrics.cancelled.inc()
        p = job.prepared
        status = "miss" if p.cache_key is not None else "off"
        usage = Usage(len(p.prompt_ids), completion_tokens, cached_tokens)
        job.emit("done", Outcome(text, reason, usage, status))
