"""Paths and helpers shared by the voice tests."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

from demos.voice_assistant.audio import WavSource

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "demos" / "voice_assistant" / "samples" / "what_is_the_capital_of_france.wav"
# CI keeps shared test audio beside the repository: <repo>/../shared/audio/
EN_DIGITS = REPO.parent / "shared" / "audio" / "en-digits-test.wav"
EN_DIGITS_TEXT = "one zero zero zero one nine oh two one oh zero one eight zero three"

# Korean fixtures (espeak-ng -v ko), with the phrase in the model's own word split.
KO_PHRASES = {
    "ko_weather.wav": "오늘 날씨 어때",   # how is the weather today
    "ko_time.wav": "지금 몇 시 야",       # what time is it now
    "ko_song.wav": "노래 를 틀어 줘",     # play a song
}
KO_GRAMMAR = [*KO_PHRASES.values(), "불 을 꺼 주세요", "감사 합니다"]


def transcribe(recognizer, path: Path, tail_silence: float = 0.0) -> str:
    """Everything the recognizer finalizes for one file, joined."""
    recognizer.reset()
    finals = []
    for chunk in WavSource(path, fast=True, tail_silence=tail_silence).chunks():
        heard = recognizer.accept(chunk)
        if heard is not None and heard.is_final and heard.text:
            finals.append(heard.text)
    last = recognizer.finish()
    if last.text:
        finals.append(last.text)
    return " ".join(finals)


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    """samples: float in [-1, 1], shape (n,) or (n, channels)."""
    data = samples if samples.ndim == 2 else samples[:, None]
    if width == 2:
        pcm = (np.clip(data, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()
    elif width == 1:
        pcm = (np.clip(data, -1, 127 / 128) * 128 + 128).astype(np.uint8).tobytes()
    elif width == 3:
        ints = (np.clip(data, -1, 1 - 2**-23) * 2**23).astype("<i4")
        pcm = ints.view(np.uint8).reshape(-1, 4)[:, :3].tobytes()
    else:
        pcm = (np.clip(data, -1, 1 - 2**-31) * 2**31).astype("<i4").tobytes()
    with wave.open(str(path), "wb") as out:
        out.setnchannels(data.shape[1])
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(pcm)
    return path


def read_samples(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as wav:
        rate = wav.getframerate()
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0, rate

# Benchmark recordings (scripts/make_voice_recordings.py): piper joe voice at several speeds/pitches, espeak-ng.
RECORDINGS = REPO / "benchmarks" / "voice"

