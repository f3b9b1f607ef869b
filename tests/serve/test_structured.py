"""response_format and tools through `edgellm serve` with the real `openai` client (tiny model)."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

import edgellm
from edgellm import SamplingParams

from .conftest import start_server

ASK = [{"role": "user", "content": "Turn the kitchen lights down a bit."}]
SCHEMA = {"type": "object", "properties": {"intent": {"enum": ["HassTurnOn", "HassTurnOff", "HassLightSet"]},
                                           "brightness": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["intent"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "set_light", "description": "Set a light's brightness",
          "parameters": {"type": "object", "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 100}},
                         "required": ["level"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def server(tiny_fp32_dir):
    s = start_server(tiny_fp32_dir)
    yield s
    s.stop()


def test_json_schema_response_format_validates_and_equals_the_runtime(server, tiny_fp32_dir):
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "intent", "schema": SCHEMA, "strict": True}}
    for seed in range(3):
        reply = client.chat.completions.create(model="any", messages=ASK, response_format=fmt, temperature=1.0,
                                               seed=seed, max_tokens=80)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    local = edgellm.load(tiny_fp32_dir)
    expected = local.generate(ASK, SamplingParams(json_schema=SCHEMA, temperature=1.0, seed=2, max_new_tokens=80))
    assert reply.choices[0].message.content == expected.text
    streamed = client.chat.completions.create(model="any", messages=ASK, response_format=fmt, temperature=1.0,
                                              seed=2, max_tokens=80, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected.text


def test_json_object_mode_on_completions(server):
    reply = server.client().completions.create(model="any", prompt="JSON:", max_tokens=200, temperature=0,
                                               extra_body={"response_format": {"type": "json_object"}})
    text = reply.choices[0].text
    assert text.startswith("{")
    if reply.choices[0].finish_reason == "stop":  # an open object may run to max_tokens on a random model
        assert isinstance(json.loads(text), dict)


def test_tools_come_back_as_tool_calls(server):
    client = server.client()
    reply = client.chat.completions.create(model="any", messages=ASK, tools=TOOLS, tool_choice="required",
                                           temperature=0, max_tokens=200)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "set_light" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    # The call and the tool's answer go back in; the next reply may be text or another call, both well formed.
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": "done"}]
    again = client.chat.completions.create(model="any", messages=history, tools=TOOLS, temperature=0, max_tokens=20)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize("extra, param, fragment", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "objekt"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_object"}, "stop": ["\n"]}, "stop", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools", "must match"),
    ({"tools": TOOLS, "stream": True}, "stream", "not supported"),
])
def test_bad_structured_requests_are_400s_naming_the_field(server, extra, param, fragment):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model="any", messages=ASK, max_tokens=5, extra_body=extra)
    error = caught.value.body
    assert error["param"] == param and fragment in error["message"]
