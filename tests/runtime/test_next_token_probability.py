"""llm.next_token_probability: P(next token in a set) after a prompt, with the prompt left in the cache."""

from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.errors import InvalidParameterError

GREEDY = edgellm.SamplingParams(max_new_tokens=1, temperature=0.0)


def test_probabilities_sum_to_one_and_the_greedy_token_is_the_likeliest(tiny_int8_dir):
    llm = edgellm.load(tiny_int8_dir)
    prompt = "The quick brown fox"
    vocab = llm.session.vocab_size
    assert llm.next_token_probability(prompt, range(vocab)) == pytest.approx(1.0, abs=1e-6)
    greedy = llm.generate(prompt, params=GREEDY).token_ids[0]
    top = llm.next_token_probability(prompt, [greedy])
    others = np.random.default_rng(0).choice([i for i in range(vocab) if i != greedy], 40, replace=False)
    assert all(llm.next_token_probability(prompt, [int(i)]) <= top for i in others)
    halves = llm.next_token_probability(prompt, range(vocab // 2)) + llm.next_token_probability(
        prompt, range(vocab // 2, vocab))
    assert halves == pytest.approx(1.0, abs=1e-6)
    # the prompt stays cached: the next generation reuses all of it but the recomputed last token
    again = llm.generate(prompt, params=GREEDY)
    assert again.timings.cached_tokens == len(llm.encode(prompt, add_generation_prompt=False)) - 1


def test_bad_token_ids_are_refused(tiny_int8_dir):
    llm = edgellm.load(tiny_int8_dir)
    for bad in ([], [-1], [llm.session.vocab_size]):
        with pytest.raises(InvalidParameterError, match="token_ids"):
            llm.next_token_probability("Hi", bad)


def test_a_cancelled_call_returns_none(tiny_int8_dir):
    llm = edgellm.load(tiny_int8_dir)
    token = edgellm.CancelToken()
    token.cancel()
    assert llm.next_token_probability("Hi there", [0], cancel=token) is None
