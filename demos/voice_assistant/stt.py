"""Speech-to-text: one small interface, a Vosk adapter and an offline English fallback, and how we pick one.

Vosk is the recognizer we want (streaming partials, word times, endpointing, many languages), but its
English model is a separate download; pocketsphinx ships an English model inside its wheel, so the
demo still runs with nothing downloaded, and says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from .errors import SttModelError
from .types import AudioChunk, Transcript

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS_DIR = REPO_ROOT / "models"
ENV_VAR = "VOSK_MODEL"
# What Vosk's loader needs: an acoustic model, its decoding settings and a graph (static or lookahead).
_REQUIRED = ("am/final.mdl", "conf/model.conf")
_GRAPHS = ("graph/HCLG.fst", "graph/HCLr.fst")


@runtime_checkable
class SpeechToText(Protocol):
    """A streaming recognizer. Times in transcripts are seconds of audio since the last reset()."""

    name: str
    sample_rate: int

    def reset(self) -> None:
        """Start a new audio stream (forget any unfinished utterance)."""

    def accept(self, chunk: AudioChunk) -> Transcript | None:
        """Feed audio; return the final transcript when an utterance ended, else the current partial (or None)."""

    def finish(self) -> Transcript:
        """End of audio: return the final transcript of whatever was heard since the last final."""

    def finalize(self) -> Transcript:
        """The turn detector decided the utterance ended: return its final transcript now, ready for the next."""

    def use_own_endpointer(self, on: bool) -> None:
        """on: the recognizer ends utterances itself (accept() returns finals); off: only finalize() does."""


def vosk_model_problems(path: str | Path) -> list[str]:
    """What keeps `path` from being a Vosk model folder (an empty list when it is one)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    missing = [rel for rel in _REQUIRED if not (path / rel).is_file()]
    if not any((path / rel).is_file() for rel in _GRAPHS):
        missing.append(" or ".join(_GRAPHS))
    return [f"missing {rel}" for rel in missing]


def check_vosk_model(path: str | Path) -> Path:
    problems = vosk_model_problems(path)
    if problems:
        raise SttModelError(
            f"{path} is not a Vosk model folder ({'; '.join(problems)}). Fix: pass the unpacked model folder "
            "(the one holding am/, conf/ and graph/), or run `python -m demos.voice_assistant download-vosk-model`.")
    return Path(path)


def find_vosk_model(explicit: str | Path | None = None, models_dir: Path = MODELS_DIR) -> Path | None:
    """--vosk-model, then $VOSK_MODEL, then the first valid models/vosk* folder; None when there is none.

    A folder the user named explicitly must be valid (error), a folder we only found is skipped (warning).
    """
    named = explicit or os.environ.get(ENV_VAR)
    if named:
        return check_vosk_model(named)
    for candidate in sorted(models_dir.glob("vosk*")):
        if candidate.is_dir() and not candidate.name.startswith("."):
            if not vosk_model_problems(candidate):
                return candidate
            logger.warning("skipping %s: not a Vosk model (%s)", candidate, "; ".join(vosk_model_problems(candidate)))
    return None


def open_recognizer(vosk_model: str | Path | None = None, grammar: Sequence[str] | None = None,
                    engine: str = "auto", endpoint_silence: float | None = None,
                    announce: Callable[[str], None] = print, models_dir: Path = MODELS_DIR,
                    fast: bool = False, commands: Any = None) -> SpeechToText:
    """The recognizer the CLI uses: Vosk when a model is found, else pocketsphinx (announced).

    commands: a CommandRecognizer whose home (areas, devices, floors) makes the command grammar every
    utterance is also decoded with (grammar.py); None: the open model only.
    """
    if engine not in ("auto", "vosk", "pocketsphinx"):
        raise SttModelError(f"unknown recognizer {engine!r}. Fix: pick auto, vosk or pocketsphinx.")
    path = None if engine == "pocketsphinx" else find_vosk_model(vosk_model, models_dir)
    if path is not None:
        from .stt_vosk import VoskRecognizer

        announce(f"speech-to-text: Vosk model {path}")
        return VoskRecognizer(path, grammar=grammar, endpoint_silence=endpoint_silence, commands=commands)
    if engine == "vosk":
        raise SttModelError(f"no Vosk model found (looked at --vosk-model, ${ENV_VAR} and {models_dir}/vosk*). "
                            "Fix: run `python -m demos.voice_assistant download-vosk-model`.")
    from .stt_sphinx import PocketSphinxRecognizer

    if engine == "auto":
        announce(f"speech-to-text: no Vosk model found (--vosk-model, ${ENV_VAR}, {models_dir}/vosk*); "
                 "falling back to the offline English pocketsphinx recognizer (less accurate). "
                 "For Vosk: python -m demos.voice_assistant download-vosk-model")
    options = {"grammar": grammar, "window": 0.3 if endpoint_silence is None else endpoint_silence, "fast": fast}
    if commands is not None:
        return PocketSphinxRecognizer.with_commands(commands, **options)
    return PocketSphinxRecognizer(**options)
