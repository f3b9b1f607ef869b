"""Audio input: format conversion (resample, downmix, sample widths), bad files, and real-time pacing."""

from __future__ import annotations

import time

import numpy as np
import pytest

from demos.voice_assistant.audio import RATE, WavSource, read_wav, resample, split
from demos.voice_assistant.errors import AudioFormatError, EmptyAudioError
from edgellm.errors import EdgeLLMError

from .helpers import FIXTURES, read_samples, write_wav


def _tone(freq: float, rate: int, seconds: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return 0.5 * np.sin(2 * np.pi * freq * t)


def _peak_hz(pcm: bytes, rate: int) -> float:
    x = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.argmax(spectrum) * rate / len(x))


def test_16k_mono_fixture_is_read_unchanged():
    audio = read_wav(FIXTURES / "ko_time.wav")
    samples, _ = read_samples(FIXTURES / "ko_time.wav")
    assert (audio.rate, audio.channels, audio.width) == (RATE, 1, 2)
    assert np.array_equal(np.frombuffer(audio.audio, dtype="<i2"), (samples * 32768).astype(np.int16))


@pytest.mark.parametrize("src_rate", [8000, 22050, 44100])
def test_other_rates_are_resampled_keeping_pitch_and_length(tmp_path, src_rate):
    path = write_wav(tmp_path / "tone.wav", _tone(440.0, src_rate), src_rate)
    audio = read_wav(path)
    assert audio.rate == RATE
    assert abs(audio.seconds - 0.5) < 1e-3
    assert abs(_peak_hz(audio.audio, RATE) - 440.0) < 3.0
    level = np.abs(np.frombuffer(audio.audio, dtype="<i2")).max() / 32768
    assert 0.45 < level < 0.55


def test_resampling_down_removes_what_the_new_rate_cannot_hold():
    tone = _tone(7000.0, 44100) + _tone(300.0, 44100)  # 7 kHz survives at 16 kHz; nothing above 8 kHz may fold back
    out = resample(tone + _tone(12000.0, 44100), 44100, RATE)
    spectrum = np.abs(np.fft.rfft(out))
    freqs = np.fft.rfftfreq(len(out), 1 / RATE)
    aliased = spectrum[np.abs(freqs - 4000.0) < 20].max()  # 12 kHz would alias to 4 kHz
    assert aliased < 0.01 * spectrum.max()


def test_stereo_is_averaged_to_mono(tmp_path):
    left = _tone(440.0, RATE)
    path = write_wav(tmp_path / "stereo.wav", np.stack([left, -left], axis=1), RATE)
    assert np.abs(np.frombuffer(read_wav(path).audio, dtype="<i2")).max() <= 1  # opposite phases cancel
    same = write_wav(tmp_path / "same.wav", np.stack([left, left], axis=1), RATE)
    assert abs(_peak_hz(read_wav(same).audio, RATE) - 440.0) < 3.0


@pytest.mark.parametrize("width", [1, 3, 4])
def test_8_24_32_bit_samples_become_16_bit(tmp_path, width):
    path = write_wav(tmp_path / f"w{width}.wav", _tone(440.0, RATE), RATE, width=width)
    pcm = np.frombuffer(read_wav(path).audio, dtype="<i2").astype(np.float64) / 32768
    assert np.abs(pcm - _tone(440.0, RATE)).max() < (2 / 128 if width == 1 else 1e-3)


def test_empty_wav_is_one_clear_error(tmp_path):
    path = write_wav(tmp_path / "empty.wav", np.zeros(0), RATE)
    with pytest.raises(EmptyAudioError, match="holds no audio"):
        read_wav(path)


@pytest.mark.parametrize("content", [b"", b"RIFF\x00\x00\x00\x00WAVEjunk", b"not a wav file at all" * 10])
def test_corrupt_wav_is_one_clear_error(tmp_path, content):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(content)
    with pytest.raises(AudioFormatError, match="not a readable PCM WAV") as caught:
        read_wav(path)
    assert isinstance(caught.value, EdgeLLMError)
    assert "sox" in str(caught.value)


def test_truncated_wav_is_one_clear_error(tmp_path):
    path = tmp_path / "cut.wav"
    path.write_bytes((FIXTURES / "ko_time.wav").read_bytes()[:30])
    with pytest.raises(AudioFormatError):
        read_wav(path)


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(AudioFormatError, match="does not exist"):
        read_wav(tmp_path / "nope.wav")


def test_split_covers_the_audio_with_timestamps():
    audio = read_wav(FIXTURES / "ko_time.wav")
    chunks = list(split(audio, 100))
    assert b"".join(c.audio for c in chunks) == audio.audio
    assert all(abs(c.seconds - 0.1) < 1e-9 for c in chunks[:-1])
    assert [round(c.timestamp, 6) for c in chunks[:3]] == [0.0, 0.1, 0.2]


def test_wav_source_paces_in_real_time_unless_fast(tmp_path):
    path = write_wav(tmp_path / "half.wav", _tone(440.0, RATE, 0.5), RATE)
    started = time.perf_counter()
    chunks = list(WavSource(path).chunks())
    paced = time.perf_counter() - started
    started = time.perf_counter()
    list(WavSource(path, fast=True).chunks())
    fast = time.perf_counter() - started
    assert len(chunks) == 5
    assert 0.45 < paced < 1.0
    assert fast < 0.1


def test_tail_silence_is_appended():
    plain = WavSource(FIXTURES / "ko_time.wav", fast=True).audio
    padded = WavSource(FIXTURES / "ko_time.wav", fast=True, tail_silence=1.0).audio
    assert len(padded.audio) - len(plain.audio) == RATE * 2
    assert not any(padded.audio[len(plain.audio):])


def test_wav_cut_mid_data_is_read_with_one_warning_naming_both_lengths(tmp_path, caplog):
    whole = (FIXTURES / "ko_time.wav").read_bytes()
    path = tmp_path / "cut_mid_data.wav"
    path.write_bytes(whole[: len(whole) // 2])  # header intact, data cut: `wave` itself reads it silently
    with caplog.at_level("WARNING", logger="demos.voice_assistant.audio"):
        audio = read_wav(path)
        read_wav(path)  # a file replayed for several runs is warned about once
    warnings = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warnings) == 1 and "Fix:" in warnings[0]
    declared = read_wav(FIXTURES / "ko_time.wav").seconds
    assert f"{declared:.2f} s" in warnings[0] and audio.seconds < declared * 0.6


def test_whole_wav_gives_no_warning(caplog):
    with caplog.at_level("WARNING", logger="demos.voice_assistant.audio"):
        read_wav(FIXTURES / "ko_time.wav")
    assert not caplog.records


def test_8khz_recording_warns_that_words_will_be_misheard(tmp_path, caplog):
    path = write_wav(tmp_path / "phone.wav", _tone(440, 8000), 8000)
    with caplog.at_level("WARNING", logger="demos.voice_assistant.audio"):
        read_wav(path)
    (message,) = [r.getMessage() for r in caplog.records]
    assert "8000 Hz" in message and "16000 Hz" in message and "Fix:" in message
    high = write_wav(tmp_path / "studio.wav", _tone(440, 44100), 44100)
    caplog.clear()
    with caplog.at_level("WARNING", logger="demos.voice_assistant.audio"):
        read_wav(high)  # downsampling loses nothing speech needs: no warning
    assert not caplog.records
