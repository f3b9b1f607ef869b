"""Voice activity detection on every audio chunk: Silero VAD on onnxruntime (no torch).

Silero scores 32 ms windows (512 samples at 16 kHz, with the previous window's last 64 samples as
context) and carries a recurrent state. `SileroVad` turns chunks of any size into window scores;
`VoiceActivity` turns scores into speech/quiet with hysteresis, and remembers where the last voiced
audio ended: the origin of every latency the assistant reports.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .audio import RATE
from .errors import AudioFormatError
from .onnx_models import VAD_FILE, check_io, open_session, packaged_model
from .types import AudioChunk

logger = logging.getLogger(__name__)

WINDOW = 512  # samples per Silero window at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous window Silero sees in front of each window


@dataclass(frozen=True)
class VadScore:
    """Speech probability of one 32 ms window that ends at `end` (seconds of stream audio)."""

    end: float
    probability: float


class SileroVad:
    """Silero VAD over a stream of 16 kHz mono 16-bit chunks; leftovers wait for the next chunk."""

    def __init__(self, path: str | Path | None = None) -> None:
        path = Path(path) if path is not None else packaged_model(VAD_FILE)
        self._session = open_session(path, "Silero VAD")
        check_io(self._session, path, "Silero VAD", {"input", "state", "sr"})
        self._sr = np.array(RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(CONTEXT, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._pending_end = 0.0  # stream time at the end of the pending samples

    def accept(self, chunk: AudioChunk) -> list[VadScore]:
        """Score every whole window the chunk completes."""
        if chunk.rate != RATE or chunk.channels != 1 or chunk.width != 2:
            raise AudioFormatError(f"Silero VAD needs {RATE} Hz mono 16-bit audio, got {chunk.rate} Hz, "
                                   f"{chunk.channels} channel(s). Fix: read audio through demos.voice_assistant.audio.")
        samples = np.frombuffer(chunk.audio, dtype="<i2").astype(np.float32) / 32768.0
        self._pending = np.concatenate([self._pending, samples])
        self._pending_end = chunk.end
        scores: list[VadScore] = []
        whole = len(self._pending) // WINDOW
        for i in range(whole):
            window = self._pending[i * WINDOW:(i + 1) * WINDOW]
            end = self._pending_end - (len(self._pending) - (i + 1) * WINDOW) / RATE
            scores.append(VadScore(round(end, 6), self.score(window)))
        self._pending = self._pending[whole * WINDOW:]
        return scores

    def score(self, window: np.ndarray) -> float:
        """Speech probability of one 512-sample float window (advances the recurrent state)."""
        x = np.concatenate([self._context, window])[None, :]
        out, self._state = self._session.run(None, {"input": x, "state": self._state, "sr": self._sr})
        self._context = window[-CONTEXT:]
        return float(out[0, 0])


@dataclass(frozen=True)
class VadConfig:
    """threshold: speech at or above; quiet below threshold - 0.15 (Silero's own hysteresis).

    start_windows/stop_windows: consecutive windows needed to switch (2 = 64 ms).
    """

    threshold: float = 0.5
    start_windows: int = 2
    stop_windows: int = 2


class VoiceActivity:
    """Speech/quiet state from window scores, and the stream time where voiced audio last ended."""

    def __init__(self, config: VadConfig | None = None) -> None:
        self.config = config or VadConfig()
        self.reset()

    def reset(self) -> None:
        self.speaking = False
        self.speech_start: float | None = None  # stream time where the current speech began
        self.last_voiced: float | None = None  # end of the last window at or above the threshold
        self._run = 0  # consecutive windows pointing the other way

    def update(self, score: VadScore) -> str | None:
        """Feed one window; returns "start" or "stop" when the state changes, else None."""
        cfg = self.config
        voiced = score.probability >= cfg.threshold
        if voiced:
            self.last_voiced = score.end
        if not self.speaking:
            self._run = self._run + 1 if voiced else 0
            if self._run >= cfg.start_windows:
                self.speaking, self._run = True, 0
                self.speech_start = round(score.end - cfg.start_windows * WINDOW / RATE, 6)
                return "start"
            return None
        quiet = score.probability < cfg.threshold - 0.15
        self._run = self._run + 1 if quiet else 0
        if self._run >= cfg.stop_windows:
            self.speaking, self._run = False, 0
            return "stop"
        return None
