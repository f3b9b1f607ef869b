"""OpenAI request bodies → typed, validated dataclasses; our answers → OpenAI's JSON shapes.

Unknown fields are ignored (OpenAI clients send many); a known field of the wrong type or out of
range is a 400 in OpenAI's error format naming the field. Fields we cannot honour with a
different meaning (n > 1, logprobs, echo, best_of > 1) are refused rather than silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from ..runtime import SamplingParams
from .structured import Structured, StructuredError, parse_structured

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_SEED = 2**63 - 1
Kind = Literal["chat", "completion"]


class RequestError(Exception):
    """An HTTP error answered in OpenAI's format: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.kind = message, param, status, code, kind
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    """One chat or completion request, as the server will run it."""

    kind: Kind
    prompt: str | tuple[int, ...] | tuple[dict[str, str], ...]  # raw text, token ids, or chat messages
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool  # extension (as in vLLM and llama.cpp): always make max_tokens tokens; for benchmarks
    structured: Structured | None = None  # response_format (JSON schema) or tools: see structured.py

    def sampling(self) -> SamplingParams:
        s = self.structured
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos,
                              json_schema=s.json_schema if s else None,
                              grammar=s.tools.grammar() if s and s.tools else None)


def _type_error(name: str, value: Any, expected: str) -> RequestError:
    return RequestError(f"{value!r} is not valid for '{name}': expected {expected}.", param=name,
                        code="invalid_type")


def _range_error(name: str, value: Any, allowed: str) -> RequestError:
    return RequestError(f"'{name}' is {value!r}; it must be {allowed}.", param=name, code="invalid_value")


def _optional_int(body: dict, name: str, minimum: int, maximum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, value, "an integer")
    if not minimum <= value <= maximum:
        raise _range_error(name, value, f"between {minimum} and {maximum}")
    return value


def _optional_number(body: dict, name: str, minimum: float, maximum: float, open_below: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _type_error(name, value, "a number")
    if value > maximum or value < minimum or (open_below and value == minimum):
        low = f"greater than {minimum}" if open_below else f"at least {minimum}"
        raise _range_error(name, value, f"{low} and at most {maximum}")
    return float(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _type_error(name, value, "true or false")
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = (value,) if isinstance(value, str) else value
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", value, "a string or a list of strings")
    stops = tuple(s for s in stops if s)
    if len(stops) > MAX_STOP_STRINGS:
        raise _range_error("stop", value, f"at most {MAX_STOP_STRINGS} strings")
    return stops


def _refuse_unsupported(body: dict) -> None:
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise _type_error("n", n, "an integer")
    if n is not None and n != 1:
        raise RequestError(f"'n' is {n}; this server makes one choice per request. Fix: send n=1 (or leave it out) "
                           "and send several requests.", param="n", code="unsupported_value")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise RequestError(f"'best_of' is {best_of!r}; only 1 is supported.", param="best_of", code="unsupported_value")
    for name in ("logprobs", "echo", "top_logprobs"):
        value = body.get(name)
        if value not in (None, False, 0):
            raise RequestError(f"'{name}' is {value!r}; this server does not return {name}. Fix: leave it out.",
                               param=name, code="unsupported_value")


def _common(body: dict, kind: Kind, prompt, max_context: int) -> GenerationRequest:
    _refuse_unsupported(body)
    max_tokens = _optional_int(body, "max_completion_tokens", 1, max_context)
    if max_tokens is None:
        max_tokens = _optional_int(body, "max_tokens", 1, max_context)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _type_error("stream_options", options, "an object")
    include_usage = (options or {}).get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise _type_error("stream_options.include_usage", include_usage, "true or false")
    try:
        structured = parse_structured(body, chat=kind == "chat")
    except StructuredError as exc:
        raise RequestError(str(exc), param=exc.param, code="invalid_value") from exc
    for name in ("stop", "ignore_eos"):
        if structured is not None and body.get(name):
            raise RequestError(f"'{name}' cannot be combined with '{structured.param}': the schema decides where "
                               f"the reply ends. Fix: leave '{name}' out.", param=name, code="invalid_value")
    return GenerationRequest(
        kind=kind, prompt=prompt, max_tokens=max_tokens,
        temperature=_optional_number(body, "temperature", 0.0, 2.0),
        top_p=_optional_number(body, "top_p", 0.0, 1.0, open_below=True),
        seed=_optional_int(body, "seed", 0, MAX_SEED), stop=_stop(body), stream=_bool(body, "stream"),
        include_usage=bool(include_usage), ignore_eos=_bool(body, "ignore_eos"), structured=structured)


def _message_text(index: int, content: Any) -> str:
    name = f"messages[{index}].content"
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{name} has a part {str(part)[:80]!r}; only text parts "
                                   "({'type': 'text', 'text': ...}) are supported.", param=name,
                                   code="unsupported_value")
            texts.append(part["text"])
        return "".join(texts)
    raise _type_error(name, content, "a string or a list of text parts")


ROLE_ALIASES = {"developer": "system"}
ROLES = ("system", "user", "assistant", "tool")


def parse_chat(body: dict, max_context: int) -> GenerationRequest:
    messages = body.get("messages")
    if messages is None:
        raise RequestError("'messages' is required. Fix: send [{'role': 'user', 'content': '...'}].",
                           param="messages", code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", messages, "a non-empty list of {'role', 'content'} objects")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _type_error(f"messages[{index}]", message, "an object with 'role' and 'content'")
        role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
        if role not in ROLES:
            raise RequestError(f"messages[{index}].role is {message.get('role')!r}; allowed: developer, "
                               f"{', '.join(ROLES)}.", param=f"messages[{index}].role", code="invalid_value")
        calls = message.get("tool_calls") if role == "assistant" else None
        content = message.get("content")
        entry = {"role": role, "content": "" if calls and content is None else _message_text(index, content)}
        if calls:  # an earlier call of ours, sent back with the tool's answer
            entry["tool_calls"] = calls
        parsed.append(entry)
    return _common(body, "chat", tuple(parsed), max_context)


def parse_completion(body: dict, max_context: int) -> GenerationRequest:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _range_error("prompt", prompt, "a non-empty string")
        value: str | tuple[int, ...] = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        value = tuple(prompt)
    elif prompt is None:
        raise RequestError("'prompt' is required.", param="prompt", code="missing_required_parameter")
    else:
        raise _type_error("prompt", str(prompt)[:80], "a string, a list of token ids, or a list of one of those")
    return _common(body, "completion", value, max_context)
