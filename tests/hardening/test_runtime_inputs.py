"""Bad arguments to generate()/stream()/SamplingParams fail at the call, with one line naming value, limit and fix."""

from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm import CancelToken, SamplingParams
from edgellm.errors import EdgeLLMError, InvalidParameterError
from edgellm.runtime.sampling import ResolvedSampling, Sampler

CHAT = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def llm(tiny_int8_dir):
    return edgellm.load(tiny_int8_dir, context_length=256)


# (case, prompt, fragments of the message)
PROMPT_CASES = [
    ("bytes", b"Hello", ["prompt=b'Hello' (bytes)", "prompt.decode('utf-8')"]),
    ("None", None, ["prompt=None (NoneType)"]),
    ("an int", 5, ["prompt=5 (int)"]),
    ("a dict, not a list of them", {"role": "user", "content": "hi"}, ["(dict) is not a prompt"]),
    ("mixed ids and messages", [1, {"role": "user", "content": "x"}], ["may not mix"]),
    ("id past the vocabulary", [1, 2, 384], ["token id 384", "0..383"]),
    ("id far past the vocabulary", [10**6], ["token id 1000000"]),
    ("negative id", [5, -1], ["token id -1"]),
    ("bools are not ids", [True, False], ["is not a prompt"]),
    ("lone surrogate in text", "caf\udce9", ["prompt has a lone surrogate", "index 3"]),
    ("lone surrogate in a message", [{"role": "user", "content": "x\ud800"}], ["messages[0]['content'] has a lone"]),
    ("content not text", [{"role": "user", "content": 5}], ["must be a string, got int"]),
    ("unknown role", [{"role": "wizard", "content": "x"}], ["role 'wizard'", "allowed roles"]),
    ("empty text", "", ["the prompt is empty"]),
]


@pytest.mark.parametrize("case,prompt,fragments", PROMPT_CASES, ids=[c[0] for c in PROMPT_CASES])
def test_bad_prompt_fails_at_the_call(llm, case, prompt, fragments):
    with pytest.raises(InvalidParameterError) as info:
        llm.stream(prompt, SamplingParams(max_new_tokens=2))  # at the call: before any iteration
    for fragment in fragments:
        assert fragment in str(info.value)
    assert "\n" not in str(info.value) and "Fix:" in str(info.value)


def test_valid_id_prompts_still_work(llm):
    ids = llm.tokenizer.encode("Hello there", add_special_tokens=False).ids
    a = llm.generate(ids, SamplingParams(max_new_tokens=4))
    b = llm.generate(np.array(ids, dtype=np.int32), SamplingParams(max_new_tokens=4))
    c = llm.generate(tuple(np.int64(i) for i in ids), SamplingParams(max_new_tokens=4))
    assert a.token_ids == b.token_ids == c.token_ids and len(a.token_ids) > 0


# (case, SamplingParams keyword arguments, name in the message)
PARAM_CASES = [
    ("temperature as a string", {"temperature": "0.5"}, "temperature='0.5'"),
    ("temperature NaN", {"temperature": float("nan")}, "temperature=nan"),
    ("temperature negative", {"temperature": -1}, "temperature=-1"),
    ("top_p as a string", {"top_p": "0.9"}, "top_p='0.9'"),
    ("top_p zero", {"top_p": 0}, "top_p=0"),
    ("top_k float", {"top_k": 2.5}, "top_k=2.5"),
    ("top_k bool", {"top_k": True}, "top_k=True"),
    ("max_new_tokens zero", {"max_new_tokens": 0}, "max_new_tokens=0"),
    ("max_new_tokens string", {"max_new_tokens": "5"}, "max_new_tokens='5'"),
    ("stop an int", {"stop": 5}, "stop=5"),
    ("stop list with an int", {"stop": ["a", 5]}, "stop=['a', 5]"),
    ("stop empty string", {"stop": [""]}, "stop=['']"),
    ("seed a string", {"seed": "abc"}, "seed='abc'"),
    ("seed negative", {"seed": -1}, "seed=-1"),
    ("repetition_penalty zero", {"repetition_penalty": 0}, "repetition_penalty=0"),
    ("ignore_eos a string", {"ignore_eos": "yes"}, "ignore_eos='yes'"),
]


@pytest.mark.parametrize("case,kwargs,name", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_sampling_params_fail_when_made(case, kwargs, name):
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**kwargs)
    assert name in str(info.value) and "it must be" in str(info.value)


# (case, stream() keyword arguments, fragment)
CALL_CASES = [
    ("deadline a string", {"deadline": "1"}, "deadline='1'"),
    ("deadline zero", {"deadline": 0}, "deadline=0"),
    ("deadline infinite", {"deadline": float("inf")}, "deadline=inf"),
    ("cancel True", {"cancel": True}, "cancel=True is not a CancelToken"),
    ("params a dict", {"params": {"temperature": 0.5}}, "not SamplingParams"),
]


@pytest.mark.parametrize("case,kwargs,fragment", CALL_CASES, ids=[c[0] for c in CALL_CASES])
def test_bad_call_arguments(llm, case, kwargs, fragment):
    with pytest.raises(InvalidParameterError, match="Fix:") as info:
        llm.stream(CHAT, **kwargs)
    assert fragment in str(info.value)


def test_tiny_temperature_is_greedy_not_nan(llm):
    """1e-310 used to divide into inf - inf = NaN probabilities; scores are now shifted before dividing."""
    greedy = llm.generate(CHAT, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    tiny = llm.generate(CHAT, SamplingParams(max_new_tokens=12, temperature=1e-310, seed=1, ignore_eos=True))
    assert tiny.token_ids == greedy.token_ids


def test_top_p_alone_is_exact_without_a_candidate_cap():
    """A flat distribution over 1,000 tokens with top_p=0.9 keeps ~900 candidates (the old code capped it at 200)."""
    logits = np.zeros(1000, dtype=np.float32)
    settings = ResolvedSampling(max_new_tokens=1, temperature=1.0, top_k=None, top_p=0.9, repetition_penalty=None,
                                seed=0, stop=())
    sampler = Sampler(settings)
    seen = {sampler(logits, []) for _ in range(4000)}
    assert len(seen) > 850  # ~900 distinct tokens drawn; the 200 cap allowed at most 200
    # a peaked distribution: only the few tokens that hold 90% of the mass
    peaked = np.full(1000, -20.0, dtype=np.float32)
    peaked[[3, 7]] = [5.0, 4.0]
    assert {sampler(peaked, []) for _ in range(200)} <= {3, 7}


def test_numpy_sampling_values_are_accepted_and_normalized():
    params = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(5), seed=np.int64(3), stop="x")
    assert type(params.temperature) is float and type(params.top_k) is int and params.stop == ("x",)


def test_errors_are_one_family():
    with pytest.raises(EdgeLLMError):
        SamplingParams(temperature="hot")
    assert issubclass(InvalidParameterError, ValueError)  # existing `except ValueError` callers keep working


def test_cancelled_before_start_gives_an_empty_cancelled_result(llm):
    token = CancelToken()
    token.cancel()
    result = llm.generate(CHAT, SamplingParams(max_new_tokens=8), cancel=token)
    assert result.finish_reason == "cancelled" and result.token_ids == ()
