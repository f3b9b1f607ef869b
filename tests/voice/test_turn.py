"""Turn-taking on real models: Silero VAD and Smart Turn v3.2 (from the pipecat-ai wheel) on committed recordings."""

from __future__ import annotations

import time

import numpy as np
import pytest

from demos.voice_assistant.audio import RATE, WavSource, read_wav
from demos.voice_assistant.errors import VoiceModelError
from demos.voice_assistant.onnx_models import TURN_FILE, VAD_FILE, packaged_model
from demos.voice_assistant.turn import SmartTurn, TurnConfig, TurnDetector, log_mel
from demos.voice_assistant.types import AudioChunk
from demos.voice_assistant.vad import SileroVad, VoiceActivity
from edgellm.errors import EdgeLLMError

from .helpers import RECORDINGS, SAMPLE


def _floats(path) -> np.ndarray:
    return np.frombuffer(read_wav(path).audio, dtype="<i2").astype(np.float32) / 32768.0


def _chunk(samples: np.ndarray, at: float = 0.0) -> AudioChunk:
    pcm = (np.clip(samples, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()
    return AudioChunk(RATE, 2, 1, pcm, at)


def _events(path, config=None, vad=None, model=None, tail=1.0):
    detector = TurnDetector(config or TurnConfig(), vad, model)
    events = []
    source = WavSource(path, fast=True, tail_silence=tail, chunk_ms=32)
    for chunk in source.chunks():
        events.extend(detector.feed(chunk))
    return events + detector.finish(source.audio.seconds)


def test_vad_tells_speech_from_silence(vad):
    vad.reset()
    scores = [s for c in WavSource(SAMPLE, fast=True, chunk_ms=100).chunks() for s in vad.accept(c)]
    assert len(scores) == len(read_wav(SAMPLE).audio) // 2 // 512  # one score per whole 32 ms window, any chunk size
    lead = [s.probability for s in scores if s.end <= 0.25]  # the sample starts with 0.3 s of silence
    voiced = [s.probability for s in scores if 0.5 <= s.end <= 1.7]
    assert max(lead) < 0.1
    assert np.mean(np.array(voiced) > 0.5) > 0.8
    vad.reset()
    quiet = vad.accept(_chunk(np.zeros(RATE)))
    assert len(quiet) == 31 and max(s.probability for s in quiet) < 0.05


def test_voice_activity_finds_where_speech_starts_and_ends(vad):
    vad.reset()
    activity, changes = VoiceActivity(), []
    for chunk in WavSource(SAMPLE, fast=True, tail_silence=0.5).chunks():
        for score in vad.accept(chunk):
            change = activity.update(score)
            if change:
                changes.append((change, score.end))
    assert [c for c, _ in changes] == ["start", "stop"]
    assert 0.2 <= activity.speech_start <= 0.4  # 0.3 s of leading silence in the file
    assert 1.7 <= activity.last_voiced <= 2.0  # speech ends 0.6 s before the end of the 2.4 s file


def test_features_equal_whisper_feature_extractor():
    """Our numpy log-mel is transformers' WhisperFeatureExtractor as Smart Turn uses it (left-padded to 8 s)."""
    from transformers import WhisperFeatureExtractor

    audio = _floats(SAMPLE)
    extractor = WhisperFeatureExtractor(chunk_length=8)
    padded = np.pad(audio, (8 * RATE - len(audio), 0))
    reference = extractor(padded, sampling_rate=RATE, padding="max_length", max_length=8 * RATE, truncation=True,
                          do_normalize=True, return_tensors="np").input_features[0]
    ours = log_mel(audio)
    assert ours.shape == reference.shape == (80, 800) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, reference, atol=2e-5)
    long = np.concatenate([np.random.default_rng(0).normal(0, 0.1, 9 * RATE).astype(np.float32), audio])
    np.testing.assert_allclose(log_mel(long), log_mel(long[-8 * RATE:]))  # only the last 8 s count


def test_smart_turn_complete_vs_incomplete(smart_turn):
    complete = _floats(SAMPLE)[:int(1.95 * RATE)]  # "What is the capital of France?" + 64 ms of its trailing silence
    spider = _floats(RECORDINGS / "piper_paused_spider.wav")
    incomplete = spider[:int(1.38 * RATE)]  # "How many legs does" + 64 ms of the mid-sentence pause
    assert smart_turn.probability(complete) > 0.8
    assert smart_turn.probability(incomplete) < 0.3


def test_detector_ends_a_complete_turn_after_a_short_silence(vad, smart_turn):
    events = _events(SAMPLE, TurnConfig(complete_silence=0.2), vad, smart_turn)
    assert [e.kind for e in events] == ["start", "pause", "end"]
    start, pause, end = events
    assert 0.2 <= start.at <= 0.4
    assert pause.complete and pause.probability >= 0.7 and pause.score_ms > 0
    assert end.reason == "complete"
    assert 0.2 - 1e-6 <= end.at - end.last_voiced <= 0.2 + 0.032 + 1e-6  # decided on the first window past 200 ms


@pytest.mark.parametrize("name", ["piper_paused_italy.wav", "piper_paused_spider.wav"])
def test_detector_waits_through_a_mid_sentence_pause(vad, smart_turn, name):
    events = _events(RECORDINGS / name, TurnConfig(), vad, smart_turn)
    ends = [e for e in events if e.kind == "end"]
    assert len(ends) == 1, events  # one turn: the question was not cut in half
    assert "resume" in [e.kind for e in events]
    assert ends[0].at > 2.2  # after the words that follow the pause


def test_fixed_silence_endpointing_waits_the_silence(vad):
    events = _events(SAMPLE, TurnConfig(endpointing="silence", fixed_silence=0.7), vad)
    (end,) = [e for e in events if e.kind == "end"]
    assert end.reason == "silence"
    assert 0.7 - 1e-6 <= end.at - end.last_voiced <= 0.7 + 0.032 + 1e-6


def test_a_speaker_who_never_stops_is_cut_at_the_maximum_turn_length(vad, smart_turn):
    words = _floats(SAMPLE)[int(0.3 * RATE):int(1.85 * RATE)]  # the question without its silences
    speech = np.tile(words, int(60 / (len(words) / RATE)) + 1)[:60 * RATE]  # 60 s of speech, no pause
    detector = TurnDetector(TurnConfig(max_turn=8.0), vad, smart_turn)
    started, events = time.perf_counter(), []
    for i in range(0, len(speech), 512):
        events.extend(detector.feed(_chunk(speech[i:i + 512], i / RATE)))
    events.extend(detector.finish(len(speech) / RATE))
    ends = [e for e in events if e.kind == "end"]
    assert time.perf_counter() - started < 120
    assert len(ends) >= 6 and all(e.reason in ("max_length", "end_of_audio") for e in ends)
    assert all(e.last_voiced is not None and e.at - e.last_voiced < 0.1 for e in ends[:-1])  # cut mid-speech
    starts = [e.at for e in events if e.kind == "start"]
    assert all(end.at - start <= 8.0 + 0.033 for start, end in zip(starts, ends, strict=False))


@pytest.mark.parametrize("kind", ["vad", "turn"])
def test_missing_model_file_is_one_clear_error(tmp_path, kind):
    missing = tmp_path / "nowhere.onnx"
    with pytest.raises(VoiceModelError) as caught:
        SileroVad(missing) if kind == "vad" else SmartTurn(missing)
    assert isinstance(caught.value, EdgeLLMError)
    assert str(missing) in str(caught.value) and "pip install --no-deps pipecat-ai" in str(caught.value)


@pytest.mark.parametrize("kind", ["vad", "turn"])
def test_corrupt_model_file_is_one_clear_error(tmp_path, kind):
    corrupt = tmp_path / "model.onnx"
    corrupt.write_bytes(packaged_model(VAD_FILE if kind == "vad" else TURN_FILE).read_bytes()[:5000])
    with pytest.raises(VoiceModelError, match="corrupt") as caught:
        SileroVad(corrupt) if kind == "vad" else SmartTurn(corrupt)
    assert str(corrupt) in str(caught.value) and "Fix:" in str(caught.value)


def test_the_wrong_model_file_is_one_clear_error():
    with pytest.raises(VoiceModelError, match="is not the Smart Turn"):
        SmartTurn(packaged_model(VAD_FILE))


def test_bad_turn_settings_are_refused_at_construction():
    with pytest.raises(EdgeLLMError, match="complete_silence"):
        TurnConfig(complete_silence=0.0)
    with pytest.raises(EdgeLLMError, match="endpointing"):
        TurnConfig(endpointing="sometimes")
