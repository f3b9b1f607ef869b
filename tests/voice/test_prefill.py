"""Incremental prefill: user words cached while they are spoken, revisions rolled back, and the result
equal to a fresh prefill of the final transcript (same greedy tokens) on the real default model."""

from __future__ import annotations

import pytest

import edgellm
from demos.voice_assistant.prefill import IncrementalPrefill, stable_words, user_text

GREEDY = edgellm.SamplingParams(max_new_tokens=24, temperature=0.0)
FINAL = ["what", "is", "the", "capital", "of", "france"]
# Partials as a streaming recognizer gives them, with a revision: "a" becomes "the" after it was cached.
PARTIALS = [["what"], ["what"], ["what", "is"], ["what", "is", "a"], ["what", "is", "a"], ["what", "is", "the"],
            ["what", "is", "the"], ["what", "is", "the", "capital"], ["what", "is", "the", "capital", "of"],
            ["what", "is", "the", "capital", "of"], ["what", "is", "the", "capital", "of", "frans"]]


def test_stable_words_is_the_common_prefix():
    assert stable_words([]) == []
    assert stable_words([["a", "b", "c"]]) == ["a", "b", "c"]
    assert stable_words([["a", "b", "c"], ["a", "b", "d"]]) == ["a", "b"]
    assert stable_words([["a", "b"], ["a", "b", "c"], ["x"]]) == []


def test_user_text_is_the_same_for_partials_and_finals():
    assert user_text(["what", "is"]) == "What is"
    assert user_text(FINAL).startswith(user_text(FINAL[:3]))
    assert user_text([]) == ""


def _fresh(llm, messages):
    llm.prefill("Unrelated text that shares no tokens with a chat prompt.")
    return llm.generate(messages, params=GREEDY)


def test_partial_prompt_tokens_are_a_prefix_of_the_final_prompt(llm):
    inc = IncrementalPrefill(llm)
    final_ids = llm.tokenizer.encode(llm.render_chat(inc.messages(user_text(FINAL))), add_special_tokens=False).ids
    for n in range(len(FINAL) + 1):
        ids = llm.tokenizer.encode(inc.prefix + user_text(FINAL[:n]), add_special_tokens=False).ids
        assert final_ids[:len(ids)] == ids, n


def test_incremental_prefill_with_revisions_equals_fresh_prefill(llm):
    inc = IncrementalPrefill(llm, agree=2, close_turn=False)
    inc.begin()
    history = []
    for partial in PARTIALS:
        if inc.update(partial):
            history.append(list(inc.committed))
    assert ["what", "is", "a"] in history and ["what", "is", "the"] in history  # cached, then revised
    assert history.index(["what", "is", "a"]) < history.index(["what", "is", "the"])
    messages = inc.messages(user_text(FINAL))
    warm = llm.generate(messages, params=GREEDY)
    fresh = _fresh(llm, messages)
    assert warm.token_ids == fresh.token_ids
    assert warm.text == fresh.text and "Paris" in warm.text
    assert fresh.timings.cached_tokens == 0
    cached_before_final = len(llm.tokenizer.encode(inc.prefix + user_text(FINAL[:5]), add_special_tokens=False).ids)
    assert warm.timings.cached_tokens == cached_before_final
    assert warm.timings.prompt_tokens == fresh.timings.prompt_tokens


@pytest.mark.parametrize("final", [[*FINAL[:5], "paris"], FINAL[:5]])
def test_closing_the_turn_on_a_pause_still_equals_fresh(llm, final):
    """A pause caches the whole turn + assistant header; whether or not the user goes on, output is unchanged."""
    inc = IncrementalPrefill(llm, agree=2, close_turn=True)
    inc.begin()
    for partial in PARTIALS[:10]:
        inc.update(partial)
    assert inc.closed and inc.committed == FINAL[:5]
    messages = inc.messages(user_text(final))
    warm = llm.generate(messages, params=GREEDY)
    fresh = _fresh(llm, messages)
    assert warm.token_ids == fresh.token_ids
    if final == FINAL[:5]:  # the bet paid: everything but the last prompt token was already cached
        assert warm.timings.cached_tokens == warm.timings.prompt_tokens - 1
    else:
        assert warm.timings.cached_tokens < warm.timings.prompt_tokens - 5


def test_disabled_prefill_caches_only_the_system_prompt(llm):
    inc = IncrementalPrefill(llm, enabled=False)
    cached = inc.begin()
    assert cached == len(llm.tokenizer.encode(inc.prefix, add_special_tokens=False).ids)
    assert not any(inc.update(p) for p in PARTIALS) and inc.prefills == 0
    result = llm.generate(inc.messages(user_text(FINAL)), params=GREEDY)
    assert result.timings.cached_tokens == cached
