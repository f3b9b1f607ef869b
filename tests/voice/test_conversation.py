"""Conversation memory: follow-ups see the earlier turns, the KV cache is reused across turns, history is bounded
and forgotten after an idle timeout or on "new conversation". Real default model, real recognizer objects."""

from __future__ import annotations

import pytest

from demos.voice_assistant.assistant import AssistantConfig, VoiceAssistant
from demos.voice_assistant.conversation import Conversation, MemoryConfig, wants_new_conversation
from demos.voice_assistant.errors import VoiceError
from demos.voice_assistant.types import Transcript


def _turn(assistant: VoiceAssistant, text: str):
    assistant.begin_turn()
    return assistant.respond(Transcript(text, is_final=True), final_at=0.0)


@pytest.fixture()
def assistant(sphinx, llm):
    return VoiceAssistant(sphinx, llm, None, config=AssistantConfig(max_new_tokens=24, endpointing="recognizer"))


def test_follow_up_holds_the_first_turn_and_reuses_its_cache(assistant, llm):
    first = _turn(assistant, "what is the capital of france")
    assert "Paris" in first.reply and first.history_exchanges == 0
    second = _turn(assistant, "and of germany")
    assert second.history_exchanges == 1
    cached = llm.tokenizer.decode(list(llm.session.tokens))  # what the model actually saw for turn 2
    assert "What is the capital of france" in cached and first.reply in cached and "And of germany" in cached
    assert cached.index("What is the capital of france") < cached.index("And of germany")
    reply_tokens = len(llm.tokenizer.encode(" " + first.reply, add_special_tokens=False).ids)
    # turn 1's prompt and the reply the model generated were still in the cache: only the new turn was computed
    assert second.cached_tokens >= first.prompt_tokens + reply_tokens - 1
    assert second.prompt_tokens - second.cached_tokens <= 12
    assert "Berlin" in second.reply  # the model understood the follow-up from the history


def test_new_conversation_forgets_and_is_answered_without_the_model(assistant):
    _turn(assistant, "what is the capital of france")
    report = _turn(assistant, "start a new conversation")
    assert report.route == "command" and report.intent == "NewConversation" and report.prompt_tokens is None
    assert assistant.conversation.exchanges == []
    assert _turn(assistant, "what is two plus two").history_exchanges == 0


def test_history_is_bounded_and_expires_when_idle():
    now = [0.0]
    chat = Conversation("system", MemoryConfig(max_exchanges=2, idle_timeout=60), clock=lambda: now[0])
    for i in range(4):
        chat.add(f"q{i}", f"a{i}")
    assert chat.exchanges == [("q2", "a2"), ("q3", "a3")]
    assert [m["content"] for m in chat.messages("q4")] == ["system", "q2", "a2", "q3", "a3", "q4"]
    now[0] = 59.0
    assert not chat.expire() and len(chat.exchanges) == 2
    now[0] = 120.0
    assert chat.expire() and chat.exchanges == []


def test_reset_phrases_and_settings():
    assert wants_new_conversation("Let's start a new conversation") and wants_new_conversation("start over")
    assert not wants_new_conversation("what is a conversation")
    with pytest.raises(VoiceError, match="max_exchanges"):
        MemoryConfig(max_exchanges=-1)
