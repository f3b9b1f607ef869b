"""The text end-of-turn signal: our own model's probability that the user's message ends after the words so far
(next token "?", "." or end of message), combined with Smart Turn in TurnDetector. Real models throughout."""

from __future__ import annotations

import pytest

from demos.voice_assistant.assistant import AssistantConfig, VoiceAssistant
from demos.voice_assistant.audio import WavSource, read_wav
from demos.voice_assistant.prefill import IncrementalPrefill
from demos.voice_assistant.turn import TurnConfig, TurnDetector

from .helpers import RECORDINGS, SAMPLE

RULE = TurnConfig()


def _end_probability(llm, text: str) -> float:
    inc = IncrementalPrefill(llm)
    inc.begin()
    for _ in range(2):  # the same partial twice: every word stable, the turn is closed in the cache
        inc.update(text.split())
    words, probability = inc.end_probability
    assert words == tuple(text.split()) and inc.closed
    return probability


@pytest.mark.parametrize("complete, cut", [
    ("what is the capital of france", "what is the capital of"),
    ("how many legs does a spider have", "how many legs does"),
    ("what is the tallest mountain in the world", "what is the tallest mountain in the"),
])
def test_the_model_reads_a_finished_question_as_finished_and_a_cut_one_as_going_on(llm, complete, cut):
    assert _end_probability(llm, complete) >= RULE.text_complete
    assert _end_probability(llm, cut) < RULE.text_continues


def _end(path, text: float | None, vad, model, config=RULE):
    """Feed a recording (fast) with a fixed text end probability; the turn's end event."""
    detector = TurnDetector(config, vad, model)
    events = []
    source = WavSource(path, fast=True, tail_silence=1.5, chunk_ms=32)
    for chunk in source.chunks():
        detector.text_probability = text if detector.in_turn else None
        events.extend(detector.feed(chunk))
    events += detector.finish(source.audio.seconds)
    ends = [e for e in events if e.kind == "end"]
    pauses = [e for e in events if e.kind == "pause"]
    assert len(ends) == 1, events
    return ends[0], pauses[-1]


def test_both_complete_ends_the_turn_at_the_confident_silence(vad, smart_turn):
    end, pause = _end(SAMPLE, 0.9, vad, smart_turn)
    assert pause.complete and end.reason == "complete_both" and end.text_probability == 0.9
    assert RULE.confident_silence - 1e-6 <= end.at - end.last_voiced <= RULE.confident_silence + 0.032 + 1e-6
    alone, _ = _end(SAMPLE, None, vad, smart_turn)  # text not known (yet): Smart Turn alone, as before
    assert alone.reason == "complete" and alone.at - alone.last_voiced >= RULE.complete_silence - 1e-6


def test_words_that_clearly_go_on_veto_a_complete_sounding_pause(vad, smart_turn):
    end, pause = _end(SAMPLE, 0.0, vad, smart_turn)
    assert pause.complete  # Smart Turn alone would have ended the turn after 0.2 s
    assert end.reason == "text_continues" and end.at - end.last_voiced >= RULE.incomplete_silence - 1e-6
    middling, _ = _end(SAMPLE, (RULE.text_continues + RULE.text_complete) / 2, vad, smart_turn)
    assert middling.reason == "complete"  # neither sure: Smart Turn decides


def test_finished_words_end_a_turn_smart_turn_hears_as_unfinished(vad, smart_turn):
    path = RECORDINGS / "piper_slower_mountain.wav"  # Smart Turn: 0.57 at the end of this slow question
    end, pause = _end(path, 0.87, vad, smart_turn)
    assert not pause.complete and end.reason == "complete_text"
    assert end.at - end.last_voiced <= RULE.complete_silence + 0.032 + 1e-6
    unsure, _ = _end(path, None, vad, smart_turn)
    assert unsure.reason == "incomplete" and unsure.at - unsure.last_voiced >= RULE.incomplete_silence - 1e-6


@pytest.mark.parametrize("name", ["piper_paused_italy.wav", "piper_paused_spider.wav", "espeak_paused_italy.wav"])
def test_the_whole_loop_never_answers_half_a_paused_question(sphinx, llm, name):
    """Real time (the recognizer's partials and the model's reading race the audio, as with a microphone)."""
    path = RECORDINGS / name
    assistant = VoiceAssistant(sphinx, llm, None, config=AssistantConfig(max_new_tokens=4, speculative=False))
    reports = list(assistant.run(WavSource(path, tail_silence=1.5, chunk_ms=32).chunks()))
    speech_end = read_wav(path).seconds - 0.6  # each recording ends with 0.6 s of silence
    assert len(reports) == 1, [(r.transcript, r.end_reason, r.end_at_s) for r in reports]
    assert reports[0].end_at_s > speech_end, reports[0]
