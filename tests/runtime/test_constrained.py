"""Constrained output on the tiny random model: whatever the model wants, the reply follows the constraint.

A random model is the hardest case for a constraint (it never "wants" valid JSON), so every output here
being valid says the mask, not the model, did it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import numpy as np
import pytest

import edgellm
from edgellm import ConstraintError, InvalidParameterError, SamplingParams
from edgellm.runtime.speculative import SpeculativeConfig, SpeculativeSession, enable_speculation

from .test_speculative import draft_dir  # noqa: F401  (a second tiny model with the same tokenizer)

INTENT_SCHEMA = {
    "type": "object",
    "properties": {
        "intent": {"enum": ["HassTurnOn", "HassTurnOff", "HassLightSet", None]},
        "area": {"type": "string", "maxLength": 12},
        "brightness": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["intent"],
    "additionalProperties": False,
}
NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]{1,6}$"}, "maxItems": 3},
        "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                                   "y": {"type": "number", "minimum": 0, "maximum": 1}},
                  "required": ["x", "y"], "additionalProperties": False},
        "kind": {"anyOf": [{"const": "a"}, {"type": "integer", "minimum": 1, "maximum": 9}]},
    },
    "required": ["ok", "point", "kind"],
    "additionalProperties": False,
}
SETTINGS = {
    "greedy": dict(temperature=0.0),
    "top_k": dict(temperature=0.8, top_k=20),
    "top_p": dict(temperature=1.0, top_p=0.9),
    "hot_penalty": dict(temperature=1.5, repetition_penalty=1.3),
}
PROMPT = [{"role": "user", "content": "Turn the kitchen lights down a bit."}]
REGEX = r"(yes|no), [0-9]{1,3} (cats|dogs)\."


@pytest.fixture(scope="module")
def llm(tiny_fp32_dir):
    return edgellm.load(tiny_fp32_dir, threads=1)


@pytest.mark.parametrize("schema", [INTENT_SCHEMA, NESTED_SCHEMA], ids=["intent", "nested"])
@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_every_output_parses_and_validates(llm, schema, setting):
    for seed in range(5):
        params = SamplingParams(json_schema=schema, max_new_tokens=300, seed=seed, **SETTINGS[setting])
        result = llm.generate(PROMPT, params)
        assert result.finish_reason == "stop", (seed, result.text)
        jsonschema.validate(json.loads(result.text), schema)


def test_the_unconstrained_model_does_not_write_json(llm):
    """The control: without the mask the random model's reply is not JSON (so the test above can fail)."""
    text = llm.generate(PROMPT, SamplingParams(max_new_tokens=40, temperature=1.0, seed=0)).text
    with pytest.raises(ValueError):
        json.loads(text)


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_a_regex_constrained_reply_matches(llm, setting):
    for seed in range(3):
        result = llm.generate("Answer:", SamplingParams(regex=REGEX, seed=seed, max_new_tokens=50, **SETTINGS[setting]))
        assert result.finish_reason == "stop"
        assert re.fullmatch(REGEX, result.text), result.text


def test_a_lark_grammar_constrains_and_streams_the_same(llm):
    grammar = 'start: "(" sum ")"\nsum: NUM (" + " NUM)*\nNUM: /[1-9][0-9]?/\n'
    params = SamplingParams(grammar=grammar, temperature=0.9, seed=4, max_new_tokens=80)
    result = llm.generate("Add:", params)
    assert result.finish_reason == "stop" and re.fullmatch(r"\((\d{1,2})( \+ \d{1,2})*\)", result.text), result.text
    stream = llm.stream("Add:", params)
    assert "".join(chunk.text for chunk in stream) == result.text
    assert stream.result.token_ids == result.token_ids


def test_a_schema_is_compiled_once_and_cached_bounded(llm):
    grammars = llm.grammars
    first = grammars.compile("json_schema", json.dumps(INTENT_SCHEMA))
    assert first is grammars.compile("json_schema", json.dumps(INTENT_SCHEMA)) and first.compile_ms > 0
    for n in range(grammars.cache_size + 5):
        grammars.compile("regex", f"[a-z]{{{n + 1}}}")
    assert len(grammars) == grammars.cache_size


@pytest.mark.parametrize("constraint, fragment", [
    (dict(json_schema={"type": "objekt"}), "objekt"),
    (dict(json_schema={"type": "object", "properties": {"a": False}, "required": ["a"]}), "unsatisfiable"),
    (dict(json_schema={"type": "string", "pattern": "(("}), "unclosed group"),
    (dict(regex="[a-z"), "unclosed character class"),
    (dict(grammar='start: "a" b\n'), "b"),
])
def test_an_invalid_constraint_is_refused_at_the_call(llm, constraint, fragment):
    with pytest.raises(ConstraintError, match=re.escape(fragment)) as caught:
        llm.stream(PROMPT, SamplingParams(**constraint))  # at the call: before any token is generated
    assert "Fix:" in str(caught.value)
    assert llm.generate(PROMPT, SamplingParams(max_new_tokens=3)).finish_reason == "length"  # the model is free


@pytest.mark.parametrize("constraint", [
    dict(regex=r"[^\x00-\U0010FFFF]"), dict(grammar='start: /[^\\x00-\\U0010FFFF]/\n'),
    dict(json_schema={"type": "integer", "minimum": 5, "maximum": 2}), dict(json_schema={"enum": []}),
    dict(json_schema={"allOf": [{"type": "string"}, {"type": "integer"}]}),
])
def test_a_constraint_that_allows_nothing_is_refused(llm, constraint):
    with pytest.raises(ConstraintError, match="allows no output|unsatisfiable|Unsatisfiable"):
        llm.stream(PROMPT, SamplingParams(**constraint))


@pytest.mark.parametrize("grammar", ['start: "a" /[^\\x00-\\U0010FFFF]/\n', 'start: a\na: "x" a\n'])
def test_a_grammar_whose_dead_end_shows_only_while_generating_fails_clearly(llm, grammar):
    """Prefixes but no complete output: not knowable before decoding, so the step that finds it says so."""
    with pytest.raises(ConstraintError, match="no way to go on after"):
        llm.generate(PROMPT, SamplingParams(grammar=grammar, max_new_tokens=20))
    assert llm.generate(PROMPT, SamplingParams(max_new_tokens=3)).finish_reason == "length"  # the model is free


def test_bad_combinations_are_refused_when_the_params_are_made():
    with pytest.raises(InvalidParameterError, match="json_schema and regex"):
        SamplingParams(json_schema={"type": "object"}, regex="a")
    with pytest.raises(InvalidParameterError, match="stop"):
        SamplingParams(regex="a+", stop=("\n",))
    with pytest.raises(InvalidParameterError, match="ignore_eos"):
        SamplingParams(grammar='start: "a"', ignore_eos=True)
    with pytest.raises(InvalidParameterError, match="not valid JSON"):
        SamplingParams(json_schema="{not json")
    with pytest.raises(InvalidParameterError, match="json_schema"):
        SamplingParams(json_schema=["a list"])


def constrained_tokens(llm, params):
    prompts = [PROMPT, [{"role": "user", "content": "the cat sat on the mat, the cat sat on the mat"}]]
    return [llm.generate(p, params).token_ids for p in prompts]


@pytest.mark.parametrize("params", [
    SamplingParams(json_schema=INTENT_SCHEMA, temperature=0.0, max_new_tokens=120),
    SamplingParams(json_schema=NESTED_SCHEMA, temperature=0.9, top_k=40, seed=11, max_new_tokens=200),
    SamplingParams(regex=r"(the (cat|mat|sat) ){1,8}on the mat", temperature=0.0, max_new_tokens=60),
], ids=["intent-greedy", "nested-sampled", "regex-greedy"])
@pytest.mark.parametrize("draft", ["model", "prompt-lookup"])
def test_constrained_speculative_equals_constrained_plain(tiny_fp32_dir, draft_dir, params, draft):  # noqa: F811
    expected = constrained_tokens(edgellm.load(tiny_fp32_dir, threads=1), params)
    llm = edgellm.load(tiny_fp32_dir, threads=1)
    drafter = edgellm.load(draft_dir, threads=1) if draft == "model" else "prompt-lookup"
    session = enable_speculation(llm, drafter, SpeculativeConfig(max_draft=4, adaptive=False))
    assert constrained_tokens(llm, params) == expected
    assert constrained_tokens(llm, params) == expected  # again, with cached prefixes and drafts in flight
    assert session.stats.cycles > 0


class ForbiddenDrafter:
    """Always proposes the same token; under a digits-only regex most of its drafts are impossible."""

    def __init__(self, token: int) -> None:
        self.token, self.proposed = token, 0

    def propose(self, context, k):
        self.proposed += k
        return [self.token] * k


def test_drafts_the_grammar_forbids_are_not_verified(tiny_fp32_dir):
    llm = edgellm.load(tiny_fp32_dir, threads=1)
    params = SamplingParams(regex="[0-9]{20}", temperature=0.0, max_new_tokens=30)
    expected = llm.generate("Digits:", params).token_ids
    letter = llm.tokenizer.token_to_id("a")
    drafter = ForbiddenDrafter(letter)
    llm.session = session = SpeculativeSession(llm.session, drafter, SpeculativeConfig(max_draft=3, adaptive=False))
    assert llm.generate("Digits:", params).token_ids == expected
    assert drafter.proposed > 0 and session.stats.drafted == 0  # every draft was cut before verification
    assert session.draft_filter is None  # the generator removes its filter when the reply ends
    free = llm.generate("Digits:", SamplingParams(temperature=0.0, max_new_tokens=10))
    assert session.stats.drafted > 0 and len(free.token_ids) == 10


def test_tool_calls_decode_under_the_tool_schemas(llm):
    tools = [{"type": "function", "function": {"name": "set_light", "description": "Set a light",
              "parameters": {"type": "object", "properties": {"area": {"type": "string", "maxLength": 10},
                                                              "level": {"type": "integer", "minimum": 0,
                                                                        "maximum": 100}},
                             "required": ["area", "level"], "additionalProperties": False}}},
             {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object",
                                                                                  "properties": {}}}}]
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for seed in range(6):
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=120)
        result = llm.generate(PROMPT, params, tools=tools, tool_choice="required")
        assert result.finish_reason == "tool_calls" and len(result.tool_calls) == 1, result.text
        call = result.tool_calls[0]
        jsonschema.validate(call.arguments, by_name[call.name])
        assert json.loads(call.to_dict()["function"]["arguments"]) == call.arguments
    named = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=1, max_new_tokens=120), tools=tools,
                         tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert [c.name for c in named.tool_calls] == ["get_time"]
    none = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=1, max_new_tokens=20), tools=tools,
                        tool_choice="none")
    assert none.tool_calls == () and not none.text.startswith("<")
    # A round trip: the assistant's call and the tool's answer render into the next prompt.
    history = PROMPT + [{"role": "assistant", "content": None, "tool_calls": [call.to_dict()]},
                        {"role": "tool", "content": "done"}]
    assert llm.generate(history, SamplingParams(max_new_tokens=5), tools=tools).timings.prompt_tokens > 0


@pytest.mark.parametrize("tools, choice, fragment", [
    ([], "auto", "non-empty list"),
    ([{"type": "function", "function": {"name": "bad name"}}], "auto", "must match"),
    ([{"type": "function", "function": {"name": "a"}}] * 2, "auto", "repeat"),
    ([{"type": "function", "function": {"name": "a", "parameters": {"type": "string"}}}], "auto", "type 'object'"),
    ([{"type": "function", "function": {"name": "a"}}], {"type": "function", "function": {"name": "b"}}, "must name"),
])
def test_bad_tools_are_refused(llm, tools, choice, fragment):
    with pytest.raises(InvalidParameterError, match=re.escape(fragment)):
        llm.generate(PROMPT, tools=tools, tool_choice=choice)


def test_tools_need_messages_and_no_other_constraint(llm):
    tools = [{"type": "function", "function": {"name": "a"}}]
    with pytest.raises(InvalidParameterError, match="chat messages"):
        llm.generate("plain text", tools=tools)
    with pytest.raises(InvalidParameterError, match="both given"):
        llm.generate(PROMPT, SamplingParams(regex="a"), tools=tools)


def test_constrained_generation_leaves_torch_out(tiny_fp32_dir):
    code = (
        "import sys, json, edgellm\n"
        f"llm = edgellm.load({str(tiny_fp32_dir)!r}, threads=1)\n"
        f"r = llm.generate('hi', edgellm.SamplingParams(json_schema={INTENT_SCHEMA!r}, max_new_tokens=60))\n"
        "json.loads(r.text)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_the_mask_goes_through_the_sampler():
    from edgellm.runtime.sampling import ResolvedSampling, Sampler

    logits = np.array([5.0, 4.0, 3.0, 2.0, 1.0], dtype=np.float32)
    allowed = np.array([False, False, True, False, True])
    greedy = Sampler(ResolvedSampling(10, 0.0, None, None, None, None, ()))
    assert greedy(logits, [], allowed) == 2
    hot = Sampler(ResolvedSampling(10, 2.0, 3, 0.99, 1.5, 0, ()))
    assert {hot(logits, [2, 4], allowed) for _ in range(50)} <= {2, 4}


def test_without_llguidance_a_constraint_says_which_extra_to_install(tiny_fp32_dir):
    code = (
        "import sys\n"
        "sys.modules['llguidance'] = None  # as if it were not installed\n"
        "import edgellm\n"
        f"llm = edgellm.load({str(tiny_fp32_dir)!r}, threads=1)\n"
        "print(llm.generate('hi', edgellm.SamplingParams(max_new_tokens=2)).finish_reason)\n"
        "try:\n"
        "    llm.generate('hi', edgellm.SamplingParams(regex='a+'))\n"
        "except edgellm.MissingDependencyError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "length" and "pip install 'edgellm[constrained]'" in out
