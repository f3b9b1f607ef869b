"""HTTP routes (Starlette): OpenAI's chat/completions/models endpoints, /health and /metrics.

Handlers only translate: body → GenerationRequest (schema.py) → Engine (engine.py) → OpenAI JSON or
server-sent events. No endpoint reads or writes a file named by the client.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .engine import Engine, Job, Outcome, Prepared
from .schema import RequestError, parse_chat, parse_completion
from .structured import Structured

logger = logging.getLogger(__name__)

DEADLINE_HEADER = "x-edgellm-deadline-ms"
MAX_DEADLINE_MS = 3_600_000
CLIENT_GONE = 499  # status recorded in metrics when the client left before its answer (nginx's convention)


@dataclass(frozen=True)
class HttpSettings:
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20


def _error_response(error: RequestError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers)


def create_app(engine: Engine, settings: HttpSettings) -> Starlette:
    metrics = engine.metrics
    model_id = engine.model_id
    context = engine.pool.first.context_length

    def counted(endpoint: str, handler: Callable[[Request], Awaitable[Response]]):
        async def wrapper(request: Request) -> Response:
            try:
                response = await handler(request)
            except RequestError as exc:
                response = _error_response(exc)
            metrics.requests.labels(endpoint, str(response.status_code)).inc()
            return response
        return wrapper

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise RequestError("Missing or incorrect API key. Fix: send the header 'Authorization: Bearer <key>' "
                               "with the key the server was started with (--api-key).", status=401,
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_json(request: Request) -> dict:
        limit = settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(f"the request body is {declared} bytes; the limit is {limit}. Fix: send a shorter "
                               "prompt (or start the server with a larger --max-body-bytes).", status=413,
                               code="request_too_large")
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > limit:
                raise RequestError(f"the request body is over the limit of {limit} bytes. Fix: send a shorter "
                                   "prompt (or start the server with a larger --max-body-bytes).", status=413,
                                   code="request_too_large")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc}).", code="invalid_json") from exc
        if not isinstance(data, dict):
            raise RequestError("the request body must be a JSON object.", code="invalid_json")
        return data

    def deadline_ms(request: Request) -> float | None:
        raw = request.headers.get(DEADLINE_HEADER)
        if raw is None:
            return None
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not 0 < value <= MAX_DEADLINE_MS:
            raise RequestError(f"X-Edgellm-Deadline-Ms is {raw!r}; it must be a number of milliseconds in "
                               f"(0, {MAX_DEADLINE_MS}].", param="X-Edgellm-Deadline-Ms", code="invalid_value")
        return value

    async def generation(request: Request, kind: str) -> Response:
        authorize(request)
        body = await read_json(request)
        parsed = parse_chat(body, context) if kind == "chat" else parse_completion(body, context)
        deadline = deadline_ms(request)
        prepared = await asyncio.to_thread(engine.prepare, parsed)
        shape = _Shape(kind, model_id, parsed.structured)
        outcome = engine.cached(prepared)
        if outcome is not None:
            headers = {"X-Edgellm-Response-Cache": "hit"}
            if parsed.stream:
                return StreamingResponse(_replay(shape, prepared, outcome), media_type="text/event-stream",
                                         headers=headers | {"Cache-Control": "no-cache"})
            return JSONResponse(shape.whole(outcome), headers=headers)
        job = engine.submit(prepared, deadline)
        headers = {"X-Edgellm-Response-Cache": "miss" if prepared.cache_key else "off"}
        if parsed.stream:
            return StreamingResponse(_events(shape, job), media_type="text/event-stream",
                                     headers=headers | {"Cache-Control": "no-cache"})
        outcome = await _collect(request, job)
        if outcome is None:
            return Response(status_code=CLIENT_GONE)
        return JSONResponse(shape.whole(outcome), headers=headers)

    async def chat(request: Request) -> Response:
        return await generation(request, "chat")

    async def completions(request: Request) -> Response:
        return await generation(request, "completion")

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [_model_card(engine)]})

    async def health(request: Request) -> Response:
        if engine.ready:
            return JSONResponse({"status": "ok", "model": model_id})
        return JSONResponse({"status": "loading", "model": model_id}, status_code=503, headers={"Retry-After": "1"})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        error = RequestError(f"{request.method} {request.url.path}: {exc.detail}", status=exc.status_code,
                             code="not_found" if exc.status_code == 404 else None)
        metrics.requests.labels("other", str(exc.status_code)).inc()
        return _error_response(error)

    routes = [
        Route("/v1/chat/completions", counted("chat", chat), methods=["POST"]),
        Route("/v1/completions", counted("completions", completions), methods=["POST"]),
        Route("/v1/models", counted("models", models), methods=["GET"]),
        Route("/health", counted("health", health), methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST"], allow_credentials=False,
                                     allow_headers=["Authorization", "Content-Type", "X-Edgellm-Deadline-Ms"]))
    return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error})


def _model_card(engine: Engine) -> dict:
    return {"id": engine.model_id, "object": "model", "created": int(engine.pool.first.folder.stat().st_mtime),
            "owned_by": "edgellm", "context_length": engine.pool.first.context_length}


class _Shape:
    """OpenAI's JSON for one response: a chat.completion or a text_completion, whole or as chunks."""

    def __init__(self, kind: str, model_id: str, structured: Structured | None = None) -> None:
        self.chat = kind == "chat"
        self.structured = structured
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.model = model_id

    def _envelope(self, obj: str, choices: list, usage: dict | None, with_usage_key: bool) -> dict:
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices}
        if with_usage_key:
            data["usage"] = usage
        return data

    def whole(self, outcome: Outcome) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": outcome.text, "refusal": None}
            reason = outcome.finish_reason
            calls = self.structured.tool_calls(outcome.text, reason) if self.structured else ()
            if calls:  # the reply was tool calls (decoded under the tools' grammar): OpenAI's shape for them
                message, reason = {**message, "content": None, "tool_calls": [c.to_dict() for c in calls]}, "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            return self._envelope("chat.completion", [choice], outcome.usage.to_dict(), True)
        choice = {"index": 0, "text": outcome.text, "logprobs": None, "finish_reason": outcome.finish_reason}
        return self._envelope("text_completion", [choice], outcome.usage.to_dict(), True)

    def chunk(self, text: str | None, finish_reason: str | None, include_usage: bool, first: bool = False) -> str:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            data = self._envelope("chat.completion.chunk", [choice], None, include_usage)
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
            data = self._envelope("text_completion", [choice], None, include_usage)
        return _sse(data)

    def usage_chunk(self, outcome: Outcome) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return _sse(self._envelope(obj, [], outcome.usage.to_dict(), True))


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"


DONE = "data: [DONE]\n\n"


async def _events(shape: _Shape, job: Job) -> AsyncIterator[str]:
    """Server-sent events of one running job. Leaving early (client gone, server stopping) cancels it."""
    include_usage = job.prepared.request.include_usage
    try:
        if shape.chat:
            yield shape.chunk(None, None, include_usage, first=True)
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield shape.chunk(value, None, include_usage)
            elif kind == "error":
                yield _sse(value.to_dict())
                break
            else:
                yield shape.chunk(None, value.finish_reason, include_usage)
                if include_usage:
                    yield shape.usage_chunk(value)
                break
        yield DONE
    finally:
        job.cancel.cancel()  # a no-op once the job is done; otherwise the client left and the model is freed


async def _replay(shape: _Shape, prepared: Prepared, outcome: Outcome) -> AsyncIterator[str]:
    include_usage = prepared.request.include_usage
    if shape.chat:
        yield shape.chunk(None, None, include_usage, first=True)
    if outcome.text:
        yield shape.chunk(outcome.text, None, include_usage)
    yield shape.chunk(None, outcome.finish_reason, include_usage)
    if include_usage:
        yield shape.usage_chunk(outcome)
    yield DONE


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(request: Request, job: Job) -> Outcome | None:
    """Wait for a job's outcome; None (and the job cancelled) if the client disconnects first."""
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        while True:
            getter = asyncio.ensure_future(job.events.get())
            done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if getter not in done:
                getter.cancel()
                job.cancel.cancel()
                return None
            kind, value = getter.result()
            if kind == "error":
                raise value
            if kind == "done":
                return value
    finally:
        watcher.cancel()
        job.cancel.cancel()
