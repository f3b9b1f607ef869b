"""Constrained output on the real default model: valid across sampling settings and seeds, exact with
speculation, tool calls that parse, and the CLI flag."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import edgellm
from edgellm import SamplingParams
from edgellm.runtime.speculative import SpeculativeConfig, enable_speculation

pytestmark = pytest.mark.integration

LIGHT = {
    "type": "object",
    "properties": {
        "intent": {"enum": ["HassTurnOn", "HassTurnOff", "HassLightSet"]},
        "area": {"enum": ["kitchen", "living room", "bedroom", "office"]},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["intent", "area"],
    "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0,
                                                                        "maximum": 120},
                   "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
ASK = {id(LIGHT): [{"role": "user", "content": "Dim the kitchen lights to forty percent. Reply in JSON."}],
       id(PERSON): [{"role": "user", "content": "Invent a person and describe them as JSON."}]}


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return edgellm.load(default_model_dir, threads=2)


@pytest.mark.parametrize("schema", [LIGHT, PERSON], ids=["light", "person"])
@pytest.mark.parametrize("options", [dict(temperature=0.0), dict(temperature=0.8, top_k=40),
                                     dict(temperature=1.2, top_p=0.95, repetition_penalty=1.1)],
                         ids=["greedy", "top_k", "top_p_penalty"])
def test_every_output_validates(llm, schema, options):
    seeds = [0] if options["temperature"] == 0 else [0, 1, 2]
    for seed in seeds:
        result = llm.generate(ASK[id(schema)], SamplingParams(json_schema=schema, seed=seed, max_new_tokens=120,
                                                              **options))
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), schema)


def test_greedy_reads_the_request(llm):
    answer = json.loads(llm.generate(ASK[id(LIGHT)], SamplingParams(json_schema=LIGHT, temperature=0.0)).text)
    assert answer["intent"] == "HassLightSet" and answer["area"] == "kitchen" and answer.get("brightness") == 40


@pytest.mark.parametrize("regex", [r"The capital of France is [A-Z][a-z]{2,12}\.", r"[0-9]{1,2}:[0-5][0-9] (am|pm)"])
def test_a_regex_answer_matches(llm, regex):
    for seed in range(3):
        result = llm.generate([{"role": "user", "content": "What is the capital of France?"}],
                              SamplingParams(regex=regex, temperature=0.9, seed=seed, max_new_tokens=40))
        assert result.finish_reason == "stop" and re.fullmatch(regex, result.text), result.text


def test_constrained_speculative_equals_plain_on_the_batch_invariant_model(default_invariant_dir):
    params = SamplingParams(json_schema=PERSON, temperature=0.0, max_new_tokens=80)
    plain = edgellm.load(default_invariant_dir, threads=2).generate(ASK[id(PERSON)], params).token_ids
    llm = edgellm.load(default_invariant_dir, threads=2)
    session = enable_speculation(llm, "prompt-lookup", SpeculativeConfig(max_draft=4, adaptive=False))
    assert llm.generate(ASK[id(PERSON)], params).token_ids == plain
    assert session.stats.accepted > 0  # grammar-forced keys were drafted and accepted


def test_a_tool_call_parses_and_validates(llm):
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"],
               "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                               "parameters": weather}}]
    result = llm.generate([{"role": "user", "content": "What's the weather in Paris?"}], tools=tools,
                          tool_choice="required")
    assert result.finish_reason == "tool_calls"
    (call,) = result.tool_calls
    assert call.name == "get_weather"
    jsonschema.validate(call.arguments, weather)


def test_cli_generate_json_schema(default_model_dir, tmp_path):
    from click.testing import CliRunner

    from edgellm.cli import main

    schema_file = tmp_path / "light.json"
    schema_file.write_text(json.dumps(LIGHT))
    done = CliRunner().invoke(main, ["generate", "-m", str(default_model_dir), "--json-schema", str(schema_file),
                                     "Dim the kitchen lights to forty percent. Reply in JSON."])
    assert done.exit_code == 0, done.output
    jsonschema.validate(json.loads(done.output.strip().splitlines()[-1]), LIGHT)
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "objekt"}')
    done = CliRunner().invoke(main, ["generate", "-m", str(default_model_dir), "--json-schema", str(bad), "hi"])
    assert done.exit_code == 1 and "objekt" in done.output and "Traceback" not in done.output
