"""espeak-ng in this process (libespeak-ng through ctypes): no program start per clause.

The `espeak-ng` command costs a process start and a voice load for every clause (16–35 ms measured
here); the library, initialized once, synthesizes a clause in ~2 ms and calls us back with each ~20 ms
buffer as it goes (a sink can stop it between two buffers). The library is the Debian package's
`libespeak-ng.so.1`, the one the command uses, so the audio is the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

from .errors import AudioDeviceError, VoiceError
from .types import SAMPLE_WIDTH, AudioChunk

logger = logging.getLogger(__name__)

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_PARAM_RATE = 1
_INITIALIZE_DONT_EXIT = 0x8000
_BUFFER_MS = 20  # audio handed to the callback at a time
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)
_SENTENCE_END = tuple(".!?;:,")

_lock = threading.Lock()  # the library keeps one global synthesizer
_library: tuple[ctypes.CDLL, int] | None = None  # (library, its sample rate) once initialized


def _load() -> tuple[ctypes.CDLL, int]:
    global _library
    if _library is not None:
        return _library
    path = ctypes.util.find_library("espeak-ng") or "libespeak-ng.so.1"
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        raise AudioDeviceError(f"libespeak-ng cannot be loaded ({exc}). Fix: `apt-get install espeak-ng` "
                               "(it brings libespeak-ng1), or install piper-tts with a voice.") from exc
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetSynthCallback.argtypes = [_CALLBACK]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, _BUFFER_MS, None, _INITIALIZE_DONT_EXIT)
    if rate <= 0:
        raise AudioDeviceError("libespeak-ng could not start (its voice data is missing?). "
                               "Fix: `apt-get install --reinstall espeak-ng-data`.")
    _library = (lib, rate)
    return _library


class EspeakLibrarySpeaker:
    """espeak-ng's voices from libespeak-ng, synthesized in-process and handed over buffer by buffer."""

    name = "espeak-ng"

    def __init__(self, voice: str = "en-us", words_per_minute: int = 175) -> None:
        with _lock:
            self._lib, self.rate = _load()
            if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
                raise VoiceError(f"espeak-ng has no voice {voice!r}. Fix: pick one from `espeak-ng --voices`.")
        self.voice, self.wpm = voice, words_per_minute
        self._sink: Callable[[AudioChunk], bool] | None = None
        self._callback = _CALLBACK(self._on_audio)  # kept alive as long as the speaker

    def synthesize(self, text: str) -> AudioChunk:
        """The whole clause at once (as the command gives it)."""
        pieces: list[bytes] = []
        self.stream(text, lambda piece: pieces.append(piece.audio) is None)
        return AudioChunk(self.rate, SAMPLE_WIDTH, 1, b"".join(pieces))

    def stream(self, text: str, sink: Callable[[AudioChunk], bool]) -> bool:
        """Call sink(piece) for each ~20 ms of audio as it is made; sink returns False to stop (barge-in).

        A text that ends without punctuation (the first words of a reply, spoken early) gets no closing
        pause, so the next piece follows without a gap. Returns False when the sink stopped it.
        """
        if not text.strip():
            return True
        data = text.encode("utf-8") + b"\0"
        flags = _CHARS_UTF8 | (_ENDPAUSE if text.rstrip().endswith(_SENTENCE_END) else 0)
        with _lock:
            self._lib.espeak_SetSynthCallback(self._callback)
            self._lib.espeak_SetVoiceByName(self.voice.encode())
            self._lib.espeak_SetParameter(_PARAM_RATE, self.wpm, 0)
            self._sink, self._stopped = sink, False
            try:
                error = self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, flags, None, None)
            finally:
                self._sink = None
        if error != 0 and not self._stopped:
            raise VoiceError(f"libespeak-ng could not speak {text[:40]!r} (error {error}).")
        return not self._stopped

    def _on_audio(self, wav: ctypes._Pointer, samples: int, events: int) -> int:
        if samples <= 0 or not wav or self._sink is None:
            return 0
        piece = AudioChunk(self.rate, SAMPLE_WIDTH, 1, ctypes.string_at(wav, samples * SAMPLE_WIDTH))
        try:
            go_on = self._sink(piece)
        except Exception:  # raised across the C library would be lost: stop, and let the caller see it
            logger.exception("speech output failed while espeak-ng was synthesizing")
            go_on = False
        if not go_on:
            self._stopped = True
            return 1
        return 0
