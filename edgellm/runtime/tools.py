"""Tool calls in the OpenAI tools format: describe the tools in the prompt, decode the call under a grammar.

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "...",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    result = llm.generate(messages, tools=tools)      # result.tool_calls == (ToolCall(name="get_weather", ...),)

Convention. SmolLM2-135M-Instruct's chat template has no tool convention (no `tools` variable, no tool
tokens), so we use the Hermes/Qwen convention that SmolLM2's larger siblings were trained on, for every
model (templates are rendered with messages only): the tools' JSON schemas go in the system message
between <tools></tools>, and the assistant answers with

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The reply is decoded under a Lark grammar built from the tools (a JSON schema per tool, `name` fixed to
the tool's name, `arguments` its `parameters`), so every call parses and its arguments validate.
tool_choice "auto" also allows a plain text reply (one that does not start with "<"); "required" or a
named function allows only calls; "none" leaves the tools out.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParameterError
from .types import ToolCall

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PARALLEL_CALLS = 4  # bounds a small model that keeps calling
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
SYSTEM_PROMPT = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    "XML tags as follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")


@dataclass(frozen=True)
class ToolSet:
    """Validated tools and the choice: what the prompt shows and the grammar allows."""

    tools: tuple[dict[str, Any], ...]  # the "function" objects, with parameters defaulted
    choice: str                         # "auto" | "required" | "none" | a tool name
    parallel: bool

    @classmethod
    def parse(cls, tools: Sequence[dict[str, Any]], tool_choice: str | dict[str, Any] = "auto",
              parallel_tool_calls: bool = False) -> ToolSet:
        if isinstance(tools, (str, bytes, dict)) or not isinstance(tools, Sequence) or not tools:
            raise InvalidParameterError(f"tools={_short(tools)} must be a non-empty list of "
                                        "{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}.")
        functions: list[dict[str, Any]] = []
        for i, tool in enumerate(tools):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
                raise InvalidParameterError(f"tools[{i}] = {_short(tool)} is not an OpenAI function tool. Fix: "
                                            "{'type': 'function', 'function': {'name': ..., 'parameters': {...}}}.")
            name = function.get("name")
            if not isinstance(name, str) or not NAME.match(name):
                raise InvalidParameterError(f"tools[{i}] has name {name!r}; a tool name must match "
                                            f"{NAME.pattern} (letters, digits, _ and -, at most 64).")
            parameters = function.get("parameters", {"type": "object", "properties": {}})
            if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
                raise InvalidParameterError(f"tools[{i}] ({name}) has parameters {_short(parameters)}; they must be "
                                            "a JSON Schema of type 'object'.")
            functions.append({**function, "parameters": parameters})
        names = [f["name"] for f in functions]
        if len(set(names)) != len(names):
            raise InvalidParameterError(f"tool names repeat: {names}. Fix: give every tool its own name.")
        if isinstance(tool_choice, dict):
            chosen = (tool_choice.get("function") or {}).get("name")
            if tool_choice.get("type") != "function" or chosen not in names:
                raise InvalidParameterError(f"tool_choice={_short(tool_choice)} must name one of the tools {names}: "
                                            "{'type': 'function', 'function': {'name': ...}}.")
            choice = chosen
        elif tool_choice in ("auto", "required", "none"):
            choice = tool_choice
        else:
            raise InvalidParameterError(f"tool_choice={tool_choice!r} must be 'auto', 'required', 'none' or "
                                        "{'type': 'function', 'function': {'name': ...}}.")
        return cls(tuple(functions), choice, bool(parallel_tool_calls))

    @property
    def callable(self) -> tuple[dict[str, Any], ...]:
        if self.choice in ("auto", "required"):
            return self.tools
        return tuple(f for f in self.tools if f["name"] == self.choice)

    def grammar(self) -> str:
        """The Lark grammar of the reply (llguidance's dialect, with %json for each call)."""
        if self.choice == "none":
            return "start: REPLY\n" + r"REPLY: /[^<][\s\S]*/"
        schema = {"anyOf": [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                             "properties": {"name": {"const": f["name"]}, "arguments": f["parameters"]}}
                            for f in self.callable], "x-guidance": JSON_LAYOUT}
        more = f'("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}' if self.parallel else ""
        start = "calls | reply" if self.choice == "auto" else "calls"
        return "\n".join([
            f"start: {start}",
            f"calls: call {more}",
            f"call: {json.dumps(OPEN)} call_json {json.dumps(CLOSE)}",
            f"call_json: %json {json.dumps(schema)}",
            "reply: REPLY",
            r"REPLY: /[^<][\s\S]*/",
        ])

    def messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation with the tools described in the system message, and earlier assistant tool
        calls written as the model writes them (so a tool-result round trip renders with any template)."""
        listing = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in self.tools)
        system = SYSTEM_PROMPT.format(tools=listing)
        out = [dict(m) for m in messages]
        for m in out:
            if m.get("role") == "assistant" and m.get("tool_calls"):
                m["content"] = "\n".join(_call_text(c) for c in m.pop("tool_calls")) if not m.get("content") \
                    else m["content"]
            if m.get("content") is None:
                m["content"] = ""
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
        return out


def parse_tool_calls(text: str) -> tuple[ToolCall, ...]:
    """The calls in a reply decoded under ToolSet.grammar(); () for a text reply or a cut-off one."""
    calls = []
    for block in text.split(OPEN)[1:]:
        body, closed, _ = block.partition(CLOSE)
        if not closed:
            return ()  # cut off (finish_reason "length")
        try:
            call = json.loads(body)
        except ValueError:
            return ()
        calls.append(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=call["name"], arguments=call["arguments"]))
    return tuple(calls)


def _call_text(call: Any) -> str:
    if isinstance(call, ToolCall):
        name, arguments = call.name, call.arguments
    else:
        function = call.get("function", {}) if isinstance(call, dict) else {}
        name, arguments = function.get("name"), function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError as exc:
                raise InvalidParameterError(f"an earlier tool call's arguments {arguments[:80]!r} are not JSON "
                                            f"({exc}). Fix: send them as the JSON text the call returned.") from exc
    return OPEN + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + CLOSE


def _short(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
