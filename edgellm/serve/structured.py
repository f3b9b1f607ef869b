"""Structured output over HTTP: OpenAI's `response_format` and `tools` → the runtime's constraints.

    response_format {"type": "text"}                                  free text (the default)
                    {"type": "json_object"}                           any JSON object
                    {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": true}}
    tools [{"type": "function", "function": {"name", "description", "parameters"}}], tool_choice,
          parallel_tool_calls                                         chat only; the reply's tool calls come
                                                                      back as message.tool_calls

Everything is checked when the request is parsed (shape) and prepared (the schema compiles), so a bad
schema is a 400 naming it, never a failure half-way through an answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParameterError
from ..runtime.tools import ToolSet, parse_tool_calls
from ..runtime.types import ToolCall

JSON_OBJECT = json.dumps({"type": "object"})


class StructuredError(ValueError):
    """A bad response_format / tools field: message and the field it names (schema.py makes it a 400)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Structured:
    """What a request asks of the reply's form: a JSON schema (text), or tools."""

    json_schema: str | None = None
    tools: ToolSet | None = None

    @property
    def param(self) -> str:
        return "tools" if self.tools is not None else "response_format"

    def messages(self, messages: tuple[dict[str, Any], ...]) -> list[dict[str, Any]]:
        return self.tools.messages(messages) if self.tools is not None else list(messages)

    def tool_calls(self, text: str, finish_reason: str) -> tuple[ToolCall, ...]:
        if self.tools is None or finish_reason != "stop":
            return ()
        return parse_tool_calls(text)


def parse_structured(body: dict, chat: bool) -> Structured | None:
    """response_format and tools of a request body (None when the reply is free text)."""
    schema = _response_format(body.get("response_format"))
    tools = body.get("tools")
    if tools is None:
        return Structured(json_schema=schema) if schema is not None else None
    if not chat:
        raise StructuredError("'tools' is a chat completions field. Fix: send it to /v1/chat/completions.", "tools")
    if schema is not None:
        raise StructuredError("'tools' and a JSON 'response_format' were both given; the tools decide the reply's "
                              "form. Fix: send one of them.", "response_format")
    if body.get("stream"):
        raise StructuredError("streaming with 'tools' is not supported yet. Fix: send stream=false.", "stream")
    parallel = body.get("parallel_tool_calls", False)
    if not isinstance(parallel, bool):
        raise StructuredError(f"'parallel_tool_calls' is {parallel!r}; it must be true or false.",
                              "parallel_tool_calls")
    try:
        toolset = ToolSet.parse(tools, body.get("tool_choice") or "auto", parallel)
    except InvalidParameterError as exc:
        raise StructuredError(str(exc), "tools") from exc
    return Structured(tools=toolset)


def _response_format(value: Any) -> str | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return JSON_OBJECT
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise StructuredError("response_format.json_schema.schema must be a JSON Schema object: "
                                  "{'type': 'json_schema', 'json_schema': {'name': ..., 'schema': {...}}}.",
                                  "response_format")
        return json.dumps(schema)
    raise StructuredError(f"response_format={json.dumps(value)[:100]} is not one of {{'type': 'text'}}, "
                          "{'type': 'json_object'}, {'type': 'json_schema', 'json_schema': {...}}.",
                          "response_format")
