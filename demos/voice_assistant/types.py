"""Small value types passed between the audio, speech-to-text and assistant layers (after wyoming's)."""

from __future__ import annotations

from dataclasses import dataclass, field

SAMPLE_WIDTH = 2  # bytes per sample: every layer speaks 16-bit little-endian PCM


@dataclass(frozen=True)
class AudioChunk:
    """A slice of 16-bit PCM. `timestamp` is seconds since the stream began (audio time, not wall time)."""

    rate: int
    width: int
    channels: int
    audio: bytes
    timestamp: float = 0.0
    available: float | None = None  # perf_counter() time the audio existed (mic callback, WAV schedule)

    @property
    def samples(self) -> int:
        return len(self.audio) // (self.width * self.channels)

    @property
    def seconds(self) -> float:
        return self.samples / self.rate

    @property
    def end(self) -> float:
        """Audio time at the chunk's last sample."""
        return self.timestamp + self.seconds


@dataclass(frozen=True)
class Word:
    """A recognized word with its span in stream audio time (seconds) and the recognizer's confidence."""

    text: str
    start: float
    end: float
    conf: float = 1.0


@dataclass(frozen=True)
class CommandRoute:
    """How a final was routed between the open model and the command grammar (grammar.py).

    score: the grammar sentence's acoustic log-likelihood minus the open sentence's, per 10 ms frame
    (0: as likely; None: no grammar sentence); at or above the threshold the grammar's sentence is taken.
    """

    open_text: str
    grammar_text: str
    score: float | None
    threshold: float
    command: bool
    ms: float  # time the command grammar added to the final (its end of utterance and the comparison)
    early: bool = False  # the final was taken at a pause that sounded final (prepare_final), not at the end


@dataclass(frozen=True)
class Transcript:
    """A recognizer hypothesis. Partials may still change; a final closes the utterance."""

    text: str
    is_final: bool
    words: tuple[Word, ...] = field(default=())
    route: CommandRoute | None = None  # finals of a recognizer with a command grammar

    @property
    def word_list(self) -> list[str]:
        return self.text.split()

    @property
    def speech_end(self) -> float | None:
        """Audio time where the last word ended (None when the recognizer gave no word times)."""
        return self.words[-1].end if self.words else None
