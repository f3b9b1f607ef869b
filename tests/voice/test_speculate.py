"""Speculative start: a reply begun in the background and cancelled (cache rolled back) changes nothing.

Greedy decoding, real onnxruntime: the tiny random model (int8) and the real default model.
"""

from __future__ import annotations

import time

import pytest

import edgellm
from demos.voice_assistant.assistant import AssistantConfig, VoiceAssistant
from demos.voice_assistant.audio import WavSource
from demos.voice_assistant.prefill import DEFAULT_SYSTEM_PROMPT
from demos.voice_assistant.speculate import Speculation
from demos.voice_assistant.turn import TurnConfig

from .helpers import RECORDINGS, SAMPLE

GREEDY = edgellm.SamplingParams(max_new_tokens=20, temperature=0.0)


def _chat(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def _wait_for_tokens(spec: Speculation, n: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while spec.tokens < n and spec.result is None and time.monotonic() < deadline:
        time.sleep(0.005)


def _rollback_equals_fresh(llm) -> None:
    final, partial = _chat("What is the capital of France"), _chat("What is the capital")
    llm.reset()
    fresh = llm.generate(final, params=GREEDY)
    assert fresh.timings.cached_tokens == 0

    spec = Speculation(llm, partial, "What is the capital", GREEDY)  # the user paused... then went on
    _wait_for_tokens(spec, 3)
    spec.cancel()
    assert spec.result is not None and spec.tokens >= 3
    after = llm.generate(final, params=GREEDY)
    assert after.token_ids == fresh.token_ids and after.text == fresh.text
    common = len(llm.tokenizer.encode(llm.render_chat(partial, add_generation_prompt=False)[:-len("<|im_end|>\n")],
                                      add_special_tokens=False).ids)
    assert common - 2 <= after.timings.cached_tokens < len(llm.encode(final)) - 1  # rolled back, not restarted

    spec = Speculation(llm, final, "What is the capital of France", GREEDY)  # the pause was the end: used as is
    _wait_for_tokens(spec, 2)
    chunks = list(spec.take())
    assert tuple(t for c in chunks for t in c.token_ids) == fresh.token_ids
    assert "".join(c.text for c in chunks) == fresh.text


def test_speculation_rollback_equals_no_speculation_tiny(tiny_int8_dir):
    _rollback_equals_fresh(edgellm.load(tiny_int8_dir))


def test_speculation_rollback_equals_no_speculation_default_model(llm):
    _rollback_equals_fresh(llm)


def test_cancel_returns_the_model_within_one_step(llm):
    spec = Speculation(llm, _chat("Tell me a long story about a dragon."), "x",
                       edgellm.SamplingParams(max_new_tokens=200, temperature=0.0))
    _wait_for_tokens(spec, 2)
    started = time.perf_counter()
    spec.cancel()
    assert time.perf_counter() - started < 1.0  # one decode step on a busy 2-core machine is ~15-100 ms
    assert spec.result.finish_reason == "cancelled" and spec.tokens < 200
    assert llm.generate("Hi", params=edgellm.SamplingParams(max_new_tokens=1)).token_ids  # the model is free


def _loop(sphinx, llm, path, speculative: bool, turn: TurnConfig):
    assistant = VoiceAssistant(sphinx, llm, None, config=AssistantConfig(
        max_new_tokens=24, speculative=speculative, turn=turn))
    return list(assistant.run(WavSource(path, fast=True, tail_silence=1.0, chunk_ms=32).chunks()))


def test_the_loop_uses_a_speculative_reply_that_equals_the_plain_one(sphinx, llm):
    (spec,) = _loop(sphinx, llm, SAMPLE, True, TurnConfig())
    (plain,) = _loop(sphinx, llm, SAMPLE, False, TurnConfig())
    assert spec.speculative and not plain.speculative
    assert spec.transcript == plain.transcript and spec.reply == plain.reply and "Paris" in spec.reply
    assert spec.end_reason in ("complete", "complete_both") and spec.turn_probability >= 0.7


def test_the_loop_cancels_when_the_user_goes_on(sphinx, llm):
    """A low threshold makes the mid-sentence pause look final: speculation starts, the user goes on, it is
    cancelled; the reply to the whole question is the one made without any speculation."""
    turn = TurnConfig(threshold=0.5, complete_silence=0.7)  # the 0.5 s pause must not end the turn here
    (spec,) = _loop(sphinx, llm, RECORDINGS / "piper_paused_italy.wav", True, turn)
    (plain,) = _loop(sphinx, llm, RECORDINGS / "piper_paused_italy.wav", False, turn)
    assert spec.speculations_cancelled >= 1
    assert spec.transcript == plain.transcript and spec.reply == plain.reply
