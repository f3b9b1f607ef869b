"""Public value types of the runtime: settings in, results out."""

from __future__ import annotations

import json
import math
import numbers
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import InvalidParameterError

FinishReason = Literal["stop", "length", "deadline", "cancelled", "tool_calls"]


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. None means "the model's default" (from its manifest).

    temperature 0 is greedy decoding; seed makes sampling repeatable; stop strings end the
    reply and are never part of it.

    Constrained output (at most one; needs `pip install 'edgellm[constrained]'`): json_schema (a dict, its
    JSON text, or a pydantic model class), regex (the whole reply matches it) or grammar (Lark, as LLGuidance
    takes it). Only tokens the constraint allows are sampled, EOS only where it may end, and the reply ends
    with finish_reason "stop" once it is complete. The schema is compiled (and checked) at the call.
    """

    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # benchmarks: always make max_new_tokens tokens
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    grammar: str | None = None

    @property
    def constraint(self) -> tuple[str, str] | None:
        """("json_schema" | "regex" | "grammar", its text), or None when output is free."""
        if self.json_schema is not None:
            # key order kept: properties are generated in the order the schema lists them
            text = self.json_schema if isinstance(self.json_schema, str) else json.dumps(self.json_schema)
            return "json_schema", text
        if self.regex is not None:
            return "regex", self.regex
        if self.grammar is not None:
            return "grammar", self.grammar
        return None

    def __post_init__(self) -> None:
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        elif isinstance(stop, (list, tuple)):
            stop = tuple(stop)
        _check(isinstance(stop, tuple) and all(isinstance(s, str) and s for s in stop), "stop", self.stop,
               "a string or a list of non-empty strings")
        object.__setattr__(self, "stop", stop)
        _check(self.max_new_tokens is None or (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1),
               "max_new_tokens", self.max_new_tokens, "an integer >= 1")
        _check(self.temperature is None or (_is_real(self.temperature) and self.temperature >= 0),
               "temperature", self.temperature, "a number >= 0 (0 = greedy)")
        _check(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1),
               "top_k", self.top_k, "an integer >= 1 (or None for no limit)")
        _check(self.top_p is None or (_is_real(self.top_p) and 0 < self.top_p <= 1), "top_p", self.top_p,
               "a number in (0, 1]")
        _check(self.repetition_penalty is None or (_is_real(self.repetition_penalty) and self.repetition_penalty > 0),
               "repetition_penalty", self.repetition_penalty, "a number > 0 (1 = off)")
        _check(self.seed is None or (_is_int(self.seed) and 0 <= self.seed < 2**128), "seed", self.seed,
               "an integer in 0..2**128-1 (or None for a random one)")
        _check(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "True or False")
        for name in ("max_new_tokens", "top_k", "seed"):  # numpy integers become plain ints
            if getattr(self, name) is not None:
                object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("temperature", "top_p", "repetition_penalty"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, float(getattr(self, name)))
        self._check_constraint()

    def _check_constraint(self) -> None:
        if hasattr(self.json_schema, "model_json_schema"):  # a pydantic model class
            object.__setattr__(self, "json_schema", self.json_schema.model_json_schema())
        given = [n for n in ("json_schema", "regex", "grammar") if getattr(self, n) is not None]
        if len(given) > 1:
            raise InvalidParameterError(f"{' and '.join(given)} were both given; output can follow one constraint. "
                                        "Fix: pass only one of json_schema, regex, grammar.")
        if not given:
            return
        name = given[0]
        value = getattr(self, name)
        if name == "json_schema":
            _check(isinstance(value, (dict, str)), name, value, "a dict, its JSON text, or a pydantic model class")
            try:
                json.loads(value) if isinstance(value, str) else json.dumps(value)
            except (TypeError, ValueError) as exc:
                raise InvalidParameterError(f"json_schema is not valid JSON ({exc}). Fix: pass a JSON Schema as a "
                                            "dict of plain JSON values, or as JSON text.") from exc
        else:
            _check(isinstance(value, str) and value != "", name, value, "a non-empty string")
        if self.stop:
            raise InvalidParameterError(f"stop={self.stop!r} cannot be combined with {name}: the constraint decides "
                                        f"where the reply ends. Fix: drop stop, or make the {name} end there.")
        if self.ignore_eos:
            raise InvalidParameterError(f"ignore_eos=True cannot be combined with {name}: the reply ends when the "
                                        f"{name} is complete. Fix: drop ignore_eos.")


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, value: object, allowed: str) -> None:
    if not ok:
        raise InvalidParameterError(f"{name}={value!r:.80} is out of range: it must be {allowed}. "
                                    "Fix: pass a value in that range.")


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
class ToolCall:
    """One call the model asked for: `arguments` parsed (it validates against the tool's parameters)."""

    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI wire shape: {"id", "type": "function", "function": {"name", "arguments": JSON text}}."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments_json}}


@dataclass(frozen=True)
class GenerationResult:
    """text: the reply as generated (with tools, the raw <tool_call> blocks); tool_calls: the calls parsed from
    it when generate(..., tools=...) was answered with calls (finish_reason "tool_calls")."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason
    timings: GenerationTimings
    tool_calls: tuple[ToolCall, ...] = ()


@dataclass(frozen=True)
class StreamChunk:
    """New text since the last chunk (always whole UTF-8 characters) and the tokens that made it."""

    text: str
    token_ids: tuple[int, ...] = field(default=())
