"""Tool calls in the OpenAI tools format: describe the tools in the prompt, decode the call under a grammar.

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "...",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    result = llm.generate(messages, tools=tools)      # result.tool_calls == (ToolCall(name="get_weather", ...),)

Convention. The chat template SmolLM2-135M-Instruct ships has no tool convention, but the SmolLM2 family
was trained with one (the 1.7B model card's function-calling format, which Ollama's SmolLM2 template uses
for every size): the tools' JSON schemas go in the system message between <tools></tools>, the assistant
answers with a JSON list of calls

    <tool_call>[
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    ]</tool_call>

and a tool's result comes back as a user turn inside <tool_response></tool_response>. We use it for every
model (templates are rendered with messages only). The reply is decoded under a Lark grammar built from
the tools (a JSON schema per tool, `name` fixed to the tool's name, `arguments` its `parameters`), so every
call parses and its arguments validate. tool_choice "auto" also allows a plain text reply (one that does
not start with "<"); "required" or a named function allows only calls; "none" only text.
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
OPEN, CLOSE, SEPARATOR = "<tool_call>[\n", "\n]</tool_call>", ",\n"
# SmolLM2's function-calling system prompt (its model card; Ollama's smollm2 template), tools as a JSON list.
SYSTEM_PROMPT = (
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you will need to make one or more function/tool calls to achieve the purpose.\n"
    "If none of the functions can be used, point it out and refuse to answer.\n"
    "If the given question lacks the parameters required by the function, also point it out.\n"
    "You have access to the following tools:\n<tools>{tools}</tools>\n"
    "The output MUST strictly adhere to the following format, and NO other text MUST be included.\n"
    "The example format is as follows. Please make sure the parameter type is correct. If no function call is "
    "needed, please make the tool calls an empty list '[]'.\n"
    "<tool_call>[\n{{\"name\": \"func_name1\", \"arguments\": {{\"argument1\": \"value1\", \"argument2\": "
    "\"value2\"}}}},\n(more tool calls as required)\n]</tool_call>")


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
        more = f'(SEP call_json){{0,{MAX_PARALLEL_CALLS - 1}}}' if self.parallel else ""
        start = "calls | reply" if self.choice == "auto" else "calls"
        return "\n".join([
            f"start: {start}",
            f"calls: {json.dumps(OPEN)} call_json {more} {json.dumps(CLOSE)}",
            f"SEP: {json.dumps(SEPARATOR)}",
            f"call_json: %json {json.dumps(schema)}",
            "reply: REPLY",
            r"REPLY: /[^<][\s\S]*/",
        ])

    def messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The conversation as SmolLM2 was trained on it: the tools in the system message, earlier assistant
        calls written as the model writes them, tool results as user turns in <tool_response> tags."""
        listing = json.dumps([{"type": "function", "function": f} for f in self.tools], ensure_ascii=False)
        system = SYSTEM_PROMPT.format(tools=listing)
        out = []
        for m in messages:
            m = dict(m)
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = m.pop("tool_calls")
                if not m.get("content"):
                    m["content"] = OPEN + SEPARATOR.join(_call_json(c) for c in calls) + CLOSE
            elif m.get("role") == "tool":
                m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
            if m.get("content") is None:
                m["content"] = ""
            out.append(m)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{system}\n\n{out[0]['content']}"}
        else:
            out.insert(0, {"role": "system", "content": system})
        return out


def parse_tool_calls(text: str) -> tuple[ToolCall, ...]:
    """The calls in a reply decoded under ToolSet.grammar(); () for a text reply or a cut-off one."""
    if not text.startswith(OPEN) or not text.endswith(CLOSE):
        return ()
    try:
        calls = json.loads(text[len(OPEN) - 2:len(text) - len(CLOSE) + 2])  # the JSON list, brackets included
    except ValueError:
        return ()
    return tuple(ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=c["name"], arguments=c["arguments"])
                 for c in calls)


def _call_json(call: Any) -> str:
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
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def _short(value: Any, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"
