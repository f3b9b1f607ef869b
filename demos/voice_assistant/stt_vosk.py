"""Vosk (Kaldi) streaming recognizer behind the SpeechToText interface.

Two measured quirks shape this adapter: a new recognizer's first AcceptWaveform calls take 1.2-1.5 s
once, so we build one recognizer, warm it with silence and reuse it after Reset(); and Vosk's word times
keep counting across Reset(), so we subtract the audio fed before the current stream.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

from edgellm.errors import MissingDependencyError

from .audio import RATE, silence
from .errors import AudioFormatError, SttModelError
from .stt import check_vosk_model
from .types import AudioChunk, CommandRoute, Transcript, Word

logger = logging.getLogger(__name__)

WARM_SECONDS = 1.0
# With a command grammar: its sentence is taken when every word's confidence is at least this (not tuned:
# no English Vosk model can be had offline here; pocketsphinx's router is the measured one).
ROUTE_CONFIDENCE = 0.9


class VoskRecognizer:
    """Streaming Vosk recognition with partials, word times and endpointing.

    grammar: phrases (in the model's own word split) to restrict recognition to; None = open vocabulary.
    endpoint_silence: trailing silence (s) that ends an utterance; None keeps the model's rules.
    """

    name = "vosk"

    def __init__(self, model_dir: str | Path, rate: int = RATE, grammar: Sequence[str] | None = None,
                 endpoint_silence: float | None = None, commands: Any = None,
                 route_confidence: float = ROUTE_CONFIDENCE) -> None:
        vosk = _import_vosk()
        model_dir = check_vosk_model(model_dir)
        graph = model_dir / "graph"
        if commands is not None and not ((graph / "HCLr.fst").is_file() and (graph / "Gr.fst").is_file()):
            raise SttModelError(f"the Vosk model {model_dir} does not support grammar: it has a static graph "
                                "(graph/HCLG.fst), not the dynamic one a phrase list needs (graph/HCLr.fst + "
                                "graph/Gr.fst). Fix: use a small or -lgraph model, or --no-command-grammar.")
        self.sample_rate = rate
        self.model_dir = model_dir
        load_dir = model_dir
        if endpoint_silence is not None:
            load_dir = _shadow_with_endpoint(model_dir, endpoint_silence)
            weakref.finalize(self, shutil.rmtree, load_dir, True)
        vosk.SetLogLevel(-1)
        try:
            self._model = vosk.Model(str(load_dir))
        except Exception as exc:  # vosk raises a bare Exception("Failed to create a model")
            raise SttModelError(f"Vosk could not load the model in {model_dir} ({exc}): the files are there but "
                                "unreadable or of another Vosk version. Fix: download the model again.") from exc
        if grammar:
            self._rec = vosk.KaldiRecognizer(self._model, rate, json.dumps(list(grammar), ensure_ascii=False))
        else:
            self._rec = vosk.KaldiRecognizer(self._model, rate)
        self._rec.SetWords(True)
        self._command_rec = None
        self._commands = commands
        self.route_confidence = route_confidence
        if commands is not None:
            self._command_rec = self._command_recognizer(vosk, commands, rate)
        self._fed = 0.0  # seconds of audio the recognizer has seen since it was created
        self._rec.AcceptWaveform(silence(WARM_SECONDS, rate))  # pay the first-call spike now, not mid-utterance
        if self._command_rec is not None:
            self._command_rec.AcceptWaveform(silence(WARM_SECONDS, rate))
        self._fed += WARM_SECONDS
        self.own_endpointer = True
        self.reset()

    def _command_recognizer(self, vosk: ModuleType, commands: Any, rate: int) -> Any:
        """A second recognizer restricted to the command sentences (grammar.CommandGrammar.phrases())."""
        from .grammar import CommandGrammar

        home = {"areas": commands.areas, "devices": commands.devices, "floors": commands.floors}
        grammar = CommandGrammar.build(**home, vocabulary=lambda word: self._model.vosk_model_find_word(word) != -1)
        rec = vosk.KaldiRecognizer(self._model, rate, json.dumps(grammar.phrases() + ["[unk]"]))
        rec.SetWords(True)
        return rec

    def reset(self) -> None:
        self._rec.Reset()
        if self._command_rec is not None:
            self._command_rec.Reset()
        self._base = self._fed
        self._held: list[Transcript] = []  # finals Vosk's endpointer gave inside a turn it does not own

    def use_own_endpointer(self, on: bool) -> None:
        """Off: a final from Vosk's own endpointer is held and joined into the next finalize()."""
        self.reset()
        self.own_endpointer = on

    def accept(self, chunk: AudioChunk) -> Transcript | None:
        if chunk.rate != self.sample_rate or chunk.channels != 1 or chunk.width != 2:
            raise AudioFormatError(f"Vosk was set up for {self.sample_rate} Hz mono 16-bit audio, got "
                                   f"{chunk.rate} Hz, {chunk.channels} channel(s), {chunk.width * 8}-bit. "
                                   "Fix: read audio through demos.voice_assistant.audio.")
        if not self.own_endpointer and self._fed == self._base:  # gated audio: map Vosk's times to the stream's
            self._base -= chunk.timestamp
        self._fed += chunk.seconds
        if self._command_rec is not None:
            self._command_rec.AcceptWaveform(chunk.audio)  # its own endpoints are ignored: finalize() reads it
        if self._rec.AcceptWaveform(chunk.audio):
            final = self._final(self._rec.Result())
            if self.own_endpointer:
                return final
            self._held.append(final)
        partial = json.loads(self._rec.PartialResult()).get("partial", "")
        if self.own_endpointer:
            return Transcript(partial, is_final=False)
        return Transcript(" ".join(t.text for t in (*self._held, Transcript(partial, False)) if t.text), False)

    def finish(self) -> Transcript:
        if not self.own_endpointer:
            return self.finalize()
        return self._final(self._rec.FinalResult())

    def finalize(self) -> Transcript:
        """Vosk's FinalResult(): the utterance ends now, whatever its endpointer thinks."""
        last = self._final(self._rec.FinalResult())
        parts = [t for t in (*self._held, last) if t.text]
        self._held = []
        if not self.own_endpointer:
            self._base = self._fed
        heard = Transcript(" ".join(t.text for t in parts), is_final=True,
                           words=tuple(w for t in parts for w in t.words))
        return heard if self._command_rec is None else self._route(heard)

    def _route(self, heard: Transcript) -> Transcript:
        """The grammar recognizer's sentence when it holds no [unk] and Vosk is sure of every word."""
        started = time.perf_counter()
        result = json.loads(self._command_rec.FinalResult())  # type: ignore[union-attr]
        sentence = result.get("text", "")
        confs = [w.get("conf", 0.0) for w in result.get("result", ())]
        usable = confs and "[unk]" not in sentence.split() and self._commands.match(sentence) is not None  # type: ignore[union-attr]
        score = min(confs) if usable else None
        command = score is not None and bool(heard.text.strip()) and score >= self.route_confidence
        route = CommandRoute(heard.text, sentence, score, self.route_confidence, command,
                             round((time.perf_counter() - started) * 1000.0, 2))
        if not command:
            return replace(heard, route=route)
        return Transcript(sentence, is_final=True, words=heard.words, route=route)

    def _final(self, raw: str) -> Transcript:
        result = json.loads(raw)
        words = tuple(Word(w["word"], w["start"] - self._base, w["end"] - self._base, w.get("conf", 1.0))
                      for w in result.get("result", ()))
        return Transcript(result.get("text", ""), is_final=True, words=words)


def _shadow_with_endpoint(model_dir: Path, seconds: float) -> Path:
    """A temporary copy of the model made of symlinks, with conf/model.conf's endpoint rules shortened.

    Vosk 0.3.45 has no API for endpointer delays; the rules live in the model's config. Rule 2 (a likely
    sentence end) gets `seconds`, rules 3 and 4 (less likely ends) two and four times that.
    """
    if not 0.05 <= seconds <= 10:
        raise SttModelError(f"endpoint silence {seconds} s is out of range: use 0.05 to 10 seconds.")
    shadow = Path(tempfile.mkdtemp(prefix="vosk-endpoint-"))
    for entry in model_dir.iterdir():
        if entry.name != "conf":
            (shadow / entry.name).symlink_to(entry.resolve())
    shutil.copytree(model_dir / "conf", shadow / "conf")
    conf = (shadow / "conf" / "model.conf").read_text()
    for rule, factor in (("rule2", 1), ("rule3", 2), ("rule4", 4)):
        line = f"--endpoint.{rule}.min-trailing-silence={seconds * factor:g}"
        pattern = rf"^--endpoint\.{rule}\.min-trailing-silence=.*$"
        conf = re.sub(pattern, line, conf, flags=re.M) if re.search(pattern, conf, re.M) else conf + f"\n{line}\n"
    (shadow / "conf" / "model.conf").write_text(conf)
    logger.info("Vosk endpoint after %.2f s of silence (model copy in %s)", seconds, shadow)
    return shadow


def _import_vosk() -> ModuleType:
    try:
        import vosk
    except ImportError as exc:
        raise MissingDependencyError("vosk", "voice", "Vosk speech recognition") from exc
    return vosk
