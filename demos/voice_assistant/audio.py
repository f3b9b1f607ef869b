"""Audio in: WAV files and the microphone, both as a stream of 16 kHz mono 16-bit AudioChunks.

Recognizers want one fixed format; converting once here (downmix, resample) keeps every other layer simple.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np

from edgellm.errors import MissingDependencyError

from .errors import AudioDeviceError, AudioFormatError, EmptyAudioError
from .types import SAMPLE_WIDTH, AudioChunk

logger = logging.getLogger(__name__)

RATE = 16000
CHUNK_MS = 100
_WARNED: set[tuple[str, Path]] = set()  # a file replayed for several runs is warned about once
_FIX = "Fix: convert it with `sox IN.wav -r 16000 -c 1 -b 16 OUT.wav`."


def read_wav(path: str | Path, rate: int = RATE) -> AudioChunk:
    """Read a whole WAV file as 16-bit mono at `rate`: stereo is averaged, other rates are resampled."""
    path = Path(path)
    if not path.is_file():
        raise AudioFormatError(f"{path} does not exist or is not a file. Fix: pass the path of a .wav recording.")
    try:
        with wave.open(str(path), "rb") as wav:
            channels, width, src_rate = wav.getnchannels(), wav.getsampwidth(), wav.getframerate()
            declared = wav.getnframes()
            frames = wav.readframes(declared)
    except (wave.Error, EOFError, OSError) as exc:
        raise AudioFormatError(f"{path} is not a readable PCM WAV file ({exc}). {_FIX}") from exc
    if len(frames) == 0:
        raise EmptyAudioError(f"{path} holds no audio (0 samples). Fix: record or pick a file with speech in it.")
    held = len(frames) // max(width * channels, 1)
    if held < declared and ("truncated", path) not in _WARNED:  # the header promises more than the file holds
        _WARNED.add(("truncated", path))
        logger.warning("%s is truncated: its header says %.2f s of audio, the file holds %.2f s, so the end of the "
                       "utterance is missing. Fix: copy or record the file again.", path, declared / src_rate,
                       held / src_rate)
    if src_rate < rate and ("rate", path) not in _WARNED:  # upsampling cannot bring back what was never recorded
        _WARNED.add(("rate", path))
        logger.warning("%s is sampled at %d Hz, below the recognizer's %d Hz: sounds above %d Hz are missing, so "
                       "words will be misheard more often. Fix: record at %d Hz or more.", path, src_rate, rate,
                       src_rate // 2, rate)
    samples = to_mono_float(frames, width, channels, source=str(path))
    if src_rate != rate:
        logger.info("resampling %s from %d Hz to %d Hz", path, src_rate, rate)
        samples = resample(samples, src_rate, rate)
    return AudioChunk(rate, SAMPLE_WIDTH, 1, to_pcm16(samples))


def to_mono_float(frames: bytes, width: int, channels: int, source: str = "audio") -> np.ndarray:
    """PCM bytes of 8/16/24/32-bit samples → float32 mono in [-1, 1]. Shape: (samples,)."""
    if width not in (1, 2, 3, 4) or channels < 1:
        raise AudioFormatError(f"{source} has {width * 8}-bit samples in {channels} channels; "
                               f"only 8/16/24/32-bit PCM can be read. {_FIX}")
    usable = len(frames) - len(frames) % (width * channels)
    raw = np.frombuffer(frames[:usable], dtype=np.uint8)
    if width == 1:  # 8-bit WAV is unsigned
        data = (raw.astype(np.float32) - 128.0) / 128.0
    elif width == 3:  # 24-bit: widen each sample to int32 by hand
        b = raw.reshape(-1, 3).astype(np.int32)
        ints = (b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)
        data = ints.astype(np.float32) / 2.0**31
    else:
        dtype = np.int16 if width == 2 else np.int32
        data = raw.view(f"<i{width}").astype(np.float32) / float(np.iinfo(dtype).max + 1)
    return data.reshape(-1, channels).mean(axis=1)  # (samples, channels) → (samples,)


def resample(samples: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling in the frequency domain (the spectrum is cut or zero-padded: no aliasing)."""
    if src_rate <= 0:
        raise AudioFormatError(f"sample rate {src_rate} Hz is not valid. {_FIX}")
    n_out = max(1, round(len(samples) * dst_rate / src_rate))
    spectrum = np.fft.rfft(samples.astype(np.float64))
    return (np.fft.irfft(spectrum, n_out) * (n_out / len(samples))).astype(np.float32)


def to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 32767 / 32768) * 32768.0).astype("<i2").tobytes()


def silence(seconds: float, rate: int = RATE) -> bytes:
    return bytes(int(seconds * rate) * SAMPLE_WIDTH)


def split(audio: AudioChunk, chunk_ms: int = CHUNK_MS) -> Iterator[AudioChunk]:
    """Cut a long chunk into pieces the size a microphone would deliver."""
    step = max(1, audio.rate * chunk_ms // 1000) * audio.width * audio.channels
    for start in range(0, len(audio.audio), step):
        yield AudioChunk(audio.rate, audio.width, audio.channels, audio.audio[start:start + step],
                         audio.timestamp + start / (audio.width * audio.channels * audio.rate))


class WavSource:
    """Replays a WAV file as a microphone would: chunk by chunk, paced in real time unless `fast`."""

    def __init__(self, path: str | Path, rate: int = RATE, chunk_ms: int = CHUNK_MS, fast: bool = False,
                 tail_silence: float = 0.0) -> None:
        self.path = Path(path)
        self.audio = read_wav(self.path, rate)
        if tail_silence > 0:  # lets an endpointer see the end of speech, as it would after a real utterance
            self.audio = AudioChunk(rate, SAMPLE_WIDTH, 1, self.audio.audio + silence(tail_silence, rate))
        self.chunk_ms, self.fast = chunk_ms, fast

    def chunks(self) -> Iterator[AudioChunk]:
        started = time.perf_counter()
        for chunk in split(self.audio, self.chunk_ms):
            if not self.fast:  # a chunk exists only once its last sample has been "spoken"
                wait = started + chunk.end - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                # when the reader lags, latency still counts from when the audio existed, not when it was read
                chunk = dataclasses.replace(chunk, available=started + chunk.end)
            yield chunk


class MicrophoneSource:
    """The default input device through sounddevice (PortAudio), as 16 kHz mono chunks.

    The callback only queues bytes; a bounded queue drops audio (with a warning) rather than grow
    without limit when the consumer stalls.
    """

    def __init__(self, rate: int = RATE, chunk_ms: int = CHUNK_MS, device: int | str | None = None,
                 max_seconds: float | None = None, max_queued_seconds: float = 30.0) -> None:
        self.rate, self.chunk_ms, self.device, self.max_seconds = rate, chunk_ms, device, max_seconds
        self._queue: queue.Queue[tuple[bytes, float]] = queue.Queue(maxsize=max(1, int(max_queued_seconds * 1000 / chunk_ms)))
        self.dropped = 0
        self._sd = _import_sounddevice()
        self._check_device()

    def _check_device(self) -> None:
        try:
            info = self._sd.query_devices(self.device, "input")
        except (ValueError, self._sd.PortAudioError) as exc:
            raise AudioDeviceError(f"no microphone found ({exc}). Fix: plug one in, or pass --wav FILE "
                                   "to use a recording instead.") from exc
        logger.info("microphone: %s", info.get("name"))

    def _callback(self, indata: object, frames: int, when: object, status: object) -> None:
        try:
            self._queue.put_nowait((bytes(indata), time.perf_counter()))  # type: ignore[call-overload]
        except queue.Full:
            if self.dropped == 0:
                logger.warning("audio consumer is too slow; dropping microphone audio")
            self.dropped += 1

    def chunks(self) -> Iterator[AudioChunk]:
        blocksize = self.rate * self.chunk_ms // 1000
        position = 0.0
        try:
            stream = self._sd.RawInputStream(samplerate=self.rate, channels=1, dtype="int16", blocksize=blocksize,
                                             device=self.device, callback=self._callback)
        except self._sd.PortAudioError as exc:
            raise AudioDeviceError(f"the microphone cannot record 16 kHz mono ({exc}). Fix: pass --wav FILE.") from exc
        with stream:
            while self.max_seconds is None or position < self.max_seconds:
                try:
                    data, arrived = self._queue.get(timeout=2.0)
                except queue.Empty as exc:
                    raise AudioDeviceError("the microphone delivered no audio for 2 s. Fix: check the device, "
                                           "or pass --wav FILE.") from exc
                chunk = AudioChunk(self.rate, SAMPLE_WIDTH, 1, data, position, arrived)
                position = chunk.end
                yield chunk


def _import_sounddevice() -> ModuleType:
    try:
        import sounddevice
    except ImportError as exc:
        raise MissingDependencyError("sounddevice", "voice", "recording from the microphone") from exc
    except OSError as exc:  # the wheel is there but libportaudio is not
        raise AudioDeviceError(f"sounddevice cannot load PortAudio ({exc}). Fix: `apt-get install libportaudio2`, "
                               "or pass --wav FILE.") from exc
    return sounddevice


def alsa_file_home(raw_pcm: str | Path, home: str | Path) -> Path:
    """Write an .asoundrc whose default device "records" a raw PCM file (ALSA's file plugin).

    Set HOME to the returned folder before sounddevice is imported: a real capture device for
    machines without a sound card (CI, containers), used by the tests of the microphone path.
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    (home / ".asoundrc").write_text(
        "pcm.!default {\n  type file\n  slave.pcm \"null\"\n  file \"/dev/null\"\n"
        f"  infile \"{os.fspath(Path(raw_pcm).resolve())}\"\n  format \"raw\"\n}}\n")
    return home
