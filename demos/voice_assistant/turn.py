"""End of turn: Silero VAD finds the pauses, Smart Turn v3.2 says whether the words so far sound finished.

A fixed silence wait must be long (Home Assistant waits 0.7 s) or it cuts off "what is the capital
of ... France". Instead, at every pause the last 8 s of the turn are scored by Smart Turn v3.2
(Whisper log-mel features in, the probability that the turn is complete out):

- complete   → the turn ends once the silence reaches `complete_silence` (0.15 s);
- incomplete → the detector keeps listening up to `incomplete_silence` (1 s);
- the words so far, when the assistant gives them (`text_probability`: our own LLM's probability that
  the user's message ends after them, next token "?", "." or end of message), are a second opinion:
  both complete → `confident_silence`; text complete where Smart Turn hesitates → `complete_silence`;
  text that clearly goes on ("what is the capital of") → never before `incomplete_silence`;
- speech again before that → the pause is forgotten and the turn goes on;
- a turn longer than `max_turn` seconds is closed anyway, so a speaker who never stops cannot hang us.

`TurnDetector.feed(chunk)` returns what happened in that chunk as `TurnEvent`s; the assistant tells
the recognizer to finalize at "end" instead of waiting for the recognizer's own endpointer.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .audio import RATE
from .errors import VoiceError
from .onnx_models import TURN_FILE, check_io, open_session, packaged_model
from .types import AudioChunk
from .vad import SileroVad, VadConfig, VadScore, VoiceActivity

logger = logging.getLogger(__name__)

# Whisper's front end, as Smart Turn v3 was trained with it (transformers' WhisperFeatureExtractor,
# chunk_length=8, do_normalize=True): 25 ms Hann windows every 10 ms, 80 Slaney mel bands, log10.
N_FFT = 400
HOP = 160
N_MELS = 80
WINDOW_SECONDS = 8
WINDOW_SAMPLES = WINDOW_SECONDS * RATE  # 128000 samples → 800 frames


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = 3.0 * hz / 200.0
    log = 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) * (27.0 / np.log(6.4))
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp((mel - 15.0) * (np.log(6.4) / 27.0)), 200.0 * mel / 3.0)


def mel_filterbank() -> np.ndarray:
    """Triangular Slaney-normalized filters, 0 Hz to 8 kHz. Shape: (N_FFT // 2 + 1, N_MELS)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(RATE / 2), N_MELS + 2))  # (82,)
    bins = np.linspace(0, RATE // 2, N_FFT // 2 + 1)  # (201,)
    slopes = edges[None, :] - bins[:, None]  # (201, 82)
    widths = np.diff(edges)  # (81,)
    rising = -slopes[:, :-2] / widths[:-1]
    falling = slopes[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges[2:] - edges[:-2]))[None, :]


_FILTERS = mel_filterbank()
_HANN = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as torch.hann_window


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Smart Turn's input for one utterance: float audio at 16 kHz → float32 (80, 800).

    As Pipecat feeds the model: the last 8 s are kept, shorter audio is zero-padded at the *start*
    (so the end of speech always sits at the end of the window), then Whisper's feature extractor:
    the whole window normalized to zero mean and unit variance, centered STFT (reflect padding),
    power spectrum → mel → log10 (floor 1e-10), last frame dropped, clamped to 8 below the maximum,
    scaled by (x + 4) / 4.
    """
    x = np.asarray(audio, dtype=np.float32).reshape(-1)[-WINDOW_SAMPLES:]
    lead = WINDOW_SAMPLES - len(x)
    x = np.pad(x, (lead, 0))
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    n_frames = 1 + WINDOW_SAMPLES // HOP  # 801
    # Frames that lie wholly in the (normalized, constant) padding are all alike: compute one of them.
    same = max(0, (lead - N_FFT // 2 - 1) // HOP + 1) if lead > N_FFT // 2 else 0
    frames = np.lib.stride_tricks.sliding_window_view(padded[same * HOP:], N_FFT)[::HOP]  # (801 - same, 400)
    if same:
        frames = np.concatenate([padded[None, :N_FFT], frames])
    power = np.abs(np.fft.rfft(frames * _HANN, axis=-1)) ** 2  # (frames, 201)
    mel = np.log10(np.maximum(power @ _FILTERS, 1e-10))  # (frames, 80)
    if same:
        mel = np.concatenate([np.broadcast_to(mel[:1], (same, N_MELS)), mel[1:]])
    mel = mel[:n_frames - 1].T  # (80, 800): the last frame is dropped, as Whisper does
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


class SmartTurn:
    """Pipecat's Smart Turn v3.2 (CPU, int8) on onnxruntime: probability that the turn is complete."""

    def __init__(self, path: str | Path | None = None, threads: int = 1) -> None:
        path = Path(path) if path is not None else packaged_model(TURN_FILE)
        self._session = open_session(path, "Smart Turn v3.2 end-of-turn", threads)
        check_io(self._session, path, "Smart Turn v3.2 end-of-turn", {"input_features"})
        self.probability(np.zeros(RATE // 2, dtype=np.float32))  # first run allocates; pay it at start-up

    def probability(self, audio: np.ndarray) -> float:
        """audio: float samples at 16 kHz (the turn so far; only the last 8 s count)."""
        out = self._session.run(None, {"input_features": log_mel(audio)[None]})[0]
        return float(np.asarray(out).reshape(-1)[0])  # the exported graph ends in a sigmoid


ENDPOINTING = ("smart", "silence")


@dataclass(frozen=True)
class TurnConfig:
    """Seconds. endpointing: "smart" (VAD + Smart Turn) or "silence" (VAD + a fixed `fixed_silence` wait)."""

    endpointing: str = "smart"
    complete_silence: float = 0.15
    incomplete_silence: float = 1.0
    fixed_silence: float = 0.7
    threshold: float = 0.7  # Smart Turn probability at or above which a pause "sounds finished" (tuned)
    confident_silence: float = 0.1  # Smart Turn and the text both say complete
    text_complete: float = 0.2  # text end probability at or above which the words "read finished"
    text_continues: float = 0.01  # below it the words clearly go on: wait incomplete_silence (0: never veto)
    max_turn: float = 20.0
    pre_roll: float = 0.5  # audio kept from before the VAD's speech start (soft word onsets, barge-in)
    vad: VadConfig = field(default_factory=VadConfig)

    def __post_init__(self) -> None:
        if self.endpointing not in ENDPOINTING:
            raise VoiceError(f"endpointing {self.endpointing!r} is not known. Fix: use one of {', '.join(ENDPOINTING)}.")
        for name in ("complete_silence", "incomplete_silence", "fixed_silence", "max_turn", "confident_silence"):
            value = getattr(self, name)
            if not 0.05 <= value <= 600:
                raise VoiceError(f"{name}={value} s is out of range. Fix: use 0.05 to 600 seconds.")
        for name in ("text_complete", "text_continues"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise VoiceError(f"{name}={value} is out of range. Fix: use a probability from 0 to 1.")
        if not 0.0 <= self.pre_roll <= 5.0:
            raise VoiceError(f"pre_roll={self.pre_roll} s is out of range. Fix: use 0 to 5 seconds.")


@dataclass(frozen=True)
class TurnEvent:
    """kind: "start" (speech began a turn), "pause" (scored), "resume" (speech after a pause), "end".

    at: stream time (s) of the window that triggered it; last_voiced: where voiced audio last ended.
    pause: probability, complete, score_ms. end: reason ("complete" (Smart Turn), "complete_both" (Smart
    Turn and the text), "complete_text" (the text alone), "incomplete", "text_continues" (Smart Turn said
    complete, the words clearly go on), "silence", "max_length", "end_of_audio"); text_probability: the
    text's end probability used for the decision (None: not known).
    """

    kind: str
    at: float
    last_voiced: float | None = None
    probability: float | None = None
    complete: bool | None = None
    score_ms: float | None = None
    reason: str | None = None
    text_probability: float | None = None


class TurnDetector:
    """Voice activity + end-of-turn decisions over an audio stream, one chunk at a time."""

    def __init__(self, config: TurnConfig | None = None, vad: SileroVad | None = None,
                 model: SmartTurn | None = None) -> None:
        self.config = config or TurnConfig()
        self.vad = vad or SileroVad()
        self.model = model if model is not None or self.config.endpointing != "smart" else SmartTurn()
        self.activity = VoiceActivity(self.config.vad)
        keep = int((self.config.pre_roll + WINDOW_SECONDS) * RATE)
        self._recent: deque[np.ndarray] = deque()  # recent float audio, bounded to `keep` samples
        self._recent_samples, self._keep = 0, keep
        self.reset()

    def reset(self) -> None:
        self.vad.reset()
        self.activity.reset()
        self._recent.clear()
        self._recent_samples = 0
        self._stream_end = 0.0
        self.in_turn = False
        self.turn_start = 0.0
        self._wait: float | None = None  # silence (s) that ends the turn after the current pause
        self._pause_reason = ""
        self._complete = False  # Smart Turn's verdict at the current pause
        self.text_probability: float | None = None  # set by the assistant: P(message ends) after the words so far

    @property
    def paused(self) -> bool:
        """In a turn, after a pause was scored, and no speech since."""
        return self.in_turn and self._wait is not None

    def feed(self, chunk: AudioChunk) -> list[TurnEvent]:
        samples = np.frombuffer(chunk.audio, dtype="<i2").astype(np.float32) / 32768.0
        self._remember(samples, chunk.end)
        events: list[TurnEvent] = []
        for score in self.vad.accept(chunk):
            events.extend(self._window(score))
        return events

    def finish(self, at: float) -> list[TurnEvent]:
        """End of the audio stream: an open turn ends here."""
        if not self.in_turn:
            return []
        self.in_turn = False
        return [TurnEvent("end", at, self.activity.last_voiced, reason="end_of_audio")]

    def _window(self, score: VadScore) -> list[TurnEvent]:
        cfg, act = self.config, self.activity
        change = act.update(score)
        events: list[TurnEvent] = []
        if change == "start":
            if not self.in_turn:
                self.in_turn, self.turn_start = True, act.speech_start or score.end
                events.append(TurnEvent("start", self.turn_start, act.last_voiced))
            elif self._wait is not None:
                events.append(TurnEvent("resume", score.end, act.last_voiced))
            self._wait = None
        elif change == "stop" and self.in_turn:
            events.append(self._pause(score.end))
        if not self.in_turn:
            return events
        if score.end - self.turn_start >= cfg.max_turn:
            logger.info("turn closed at the maximum length (%.1f s)", cfg.max_turn)
            self.in_turn, self._wait = False, None
            events.append(TurnEvent("end", score.end, act.last_voiced, reason="max_length"))
            self.activity.reset()  # a speaker who goes on starts a new turn
        elif self._wait is not None and act.last_voiced is not None:
            wait, reason = self._decide()
            if score.end - act.last_voiced >= wait - 1e-6:
                self.in_turn, self._wait = False, None
                events.append(TurnEvent("end", score.end, act.last_voiced, reason=reason,
                                        text_probability=self.text_probability))
        return events

    def _decide(self) -> tuple[float, str]:
        """The silence that ends the current pause, and why: Smart Turn's verdict, then the words' (if known)."""
        cfg, text = self.config, self.text_probability
        if self._pause_reason == "silence" or text is None:
            return self._wait, self._pause_reason  # type: ignore[return-value]
        if text < cfg.text_continues:
            return cfg.incomplete_silence, "text_continues" if self._complete else "incomplete"
        if text >= cfg.text_complete:
            if self._complete:
                return min(cfg.confident_silence, cfg.complete_silence), "complete_both"
            return cfg.complete_silence, "complete_text"
        return self._wait, self._pause_reason  # type: ignore[return-value]

    def _pause(self, at: float) -> TurnEvent:
        cfg = self.config
        if cfg.endpointing == "silence" or self.model is None:
            self._wait, self._pause_reason = cfg.fixed_silence, "silence"
            return TurnEvent("pause", at, self.activity.last_voiced)
        started = time.perf_counter()
        probability = self.model.probability(self.turn_audio())
        score_ms = round((time.perf_counter() - started) * 1000.0, 1)
        complete = probability >= cfg.threshold
        self._complete = complete
        self._wait = cfg.complete_silence if complete else cfg.incomplete_silence
        self._pause_reason = "complete" if complete else "incomplete"
        logger.debug("pause at %.2f s: complete p=%.3f (%s ms)", at, probability, score_ms)
        return TurnEvent("pause", at, self.activity.last_voiced, probability, complete, score_ms)

    def turn_audio(self) -> np.ndarray:
        """The current turn's audio, from `pre_roll` before its start to now (at most 8 s + pre-roll)."""
        audio = np.concatenate(list(self._recent)) if self._recent else np.zeros(0, np.float32)
        first = self._stream_end - len(audio) / RATE
        start = max(0, int(round((self.turn_start - self.config.pre_roll - first) * RATE)))
        return audio[start:]

    def _remember(self, samples: np.ndarray, end: float) -> None:
        self._recent.append(samples)
        self._recent_samples += len(samples)
        self._stream_end = end
        while self._recent and self._recent_samples - len(self._recent[0]) >= self._keep:
            self._recent_samples -= len(self._recent.popleft())
