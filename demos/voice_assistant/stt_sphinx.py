"""Offline English fallback: pocketsphinx, whose US English model ships inside its wheel.

Less accurate than Vosk (WER about 0.2 on a human recording) but nothing to download. Its own
voice-activity endpointer cuts utterances; the decoder gives partials and word times.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgellm.errors import MissingDependencyError

from .audio import RATE
from .errors import AudioFormatError, VoiceError
from .types import AudioChunk, CommandRoute, Transcript, Word

if TYPE_CHECKING:
    from .grammar import CommandGrammar

logger = logging.getLogger(__name__)

FRAMES_PER_SECOND = 100  # pocketsphinx's default feature frame rate
# Acoustic score of the command grammar's sentence minus the open model's (per frame), at or above which
# the sentence is taken: tuned on the tune_* files of benchmarks/voice/commands/ by scripts/bench_commands.py.
ROUTE_THRESHOLD = -11.2
_FILLERS = re.compile(r"^(<s>|</s>|<sil>|\[.*\]|\+\+.*\+\+)$")


class PocketSphinxRecognizer:
    """Streaming pocketsphinx with VAD endpointing.

    window: seconds of non-speech that end an utterance (the endpointer's decision window).
    grammar: phrases to restrict recognition to (compiled to a JSGF grammar); None = its language model.
    fast: for turn-taking, where the recognizer is on the critical path. No second (flat-lexicon) pass
        at the end of an utterance: the final result comes about 5x sooner (70 ms instead of 360 ms on a
        loaded 2-core machine); and a pruned search (at most 3000 HMMs and 5 words per frame): 1.7x less
        CPU per second of audio. Word error rate on benchmarks/voice/ (synthetic voices): 0.37 accurate,
        0.36 fast; on the human digits recording the accurate setting is better.
    """

    name = "pocketsphinx"

    def __init__(self, rate: int = RATE, window: float = 0.3, grammar: Sequence[str] | None = None,
                 fast: bool = False, commands: CommandGrammar | None = None,
                 route_threshold: float = ROUTE_THRESHOLD, is_command: Callable[[str], bool] | None = None) -> None:
        try:
            import pocketsphinx
        except ImportError as exc:
            raise MissingDependencyError("pocketsphinx", "dev", "the offline English fallback recognizer") from exc
        self._ps = pocketsphinx
        self.sample_rate, self.window = rate, window
        speed = {"fwdflat": False, "maxhmmpf": 3000, "maxwpf": 5} if fast else {}
        self._decoder = pocketsphinx.Decoder(samprate=rate, loglevel="FATAL", **speed)
        if grammar:
            self._use_grammar(grammar)
        self._command_decoder = self._aligner = None
        self._audio: list[bytes] = []
        if commands is not None:
            if not -100.0 <= route_threshold <= 0.0:
                raise VoiceError(f"route threshold {route_threshold} is out of range. Fix: use -100 to 0 (0: only a "
                                 f"sentence as likely as the open model's is a command; default {ROUTE_THRESHOLD}).")
            self.route_threshold = route_threshold
            self._is_command = is_command or (lambda text: True)
            # bestpath off: its lattice pass took 0.7-4 s at the end of an utterance on this grammar, and
            # then returned a cut-short sentence ("set a timer for five") more often than the plain search
            self._command_decoder = pocketsphinx.Decoder(samprate=rate, loglevel="FATAL", bestpath=False, **speed)
            self._command_decoder.add_fsg("commands", self._command_decoder.create_fsg(
                "commands", *commands.fsg_transitions()))
            self._command_decoder.activate_search("commands")
            self._aligner = pocketsphinx.Decoder(samprate=rate, loglevel="FATAL")  # scores both results
        self._in_utt = False
        self.own_endpointer = True
        self.reset()

    def use_own_endpointer(self, on: bool) -> None:
        """Off: every accepted chunk goes to the decoder and only finalize() ends the utterance."""
        self.reset()
        self.own_endpointer = on

    def _use_grammar(self, phrases: Sequence[str]) -> None:
        rules = " | ".join(" ".join(re.sub(r"[^a-z' ]", " ", p.lower()).split()) for p in phrases)
        try:
            self._decoder.add_jsgf_string("grammar", f"#JSGF V1.0;\ngrammar phrases;\npublic <phrase> = {rules};\n")
        except ValueError as exc:
            raise VoiceError(f"pocketsphinx cannot use the grammar {list(phrases)!r} ({exc}). Fix: use English words "
                             "from its dictionary, or drop --grammar.") from exc
        self._decoder.activate_search("grammar")

    @classmethod
    def with_commands(cls, commands: Any = None, **options: Any) -> PocketSphinxRecognizer:
        """A recognizer that also decodes every utterance with the command grammar of `commands`
        (a CommandRecognizer's home, or the default one) and routes each final by the two results."""
        from .grammar import CommandGrammar

        lookup = pocketsphinx_vocabulary()
        home = {} if commands is None else {"areas": commands.areas, "devices": commands.devices,
                                            "floors": commands.floors}
        matches = None if commands is None else (lambda text: commands.match(text) is not None)
        return cls(commands=CommandGrammar.build(**home, vocabulary=lookup), is_command=matches, **options)

    def _start(self) -> None:
        self._decoder.start_utt()
        if self._command_decoder is not None:
            self._command_decoder.start_utt()
            self._audio = []

    def _process(self, audio: bytes) -> None:
        self._decoder.process_raw(audio, False, False)
        if self._command_decoder is not None:
            self._command_decoder.process_raw(audio, False, False)
            self._audio.append(audio)  # kept for the alignments that score the two results

    def _end(self) -> None:
        self._decoder.end_utt()
        if self._command_decoder is not None:
            self._command_decoder.end_utt()

    def reset(self) -> None:
        if self._in_utt and getattr(self, "_early", None) is None:  # an early final already ended the decoders
            self._end()
        try:
            self._endpointer = self._ps.Endpointer(window=self.window, sample_rate=self.sample_rate)
        except ValueError as exc:
            raise VoiceError(f"pocketsphinx cannot end utterances after {self.window * 1000:.0f} ms of silence ({exc})."
                             " Fix: use --endpoint-ms 200 or more.") from exc
        self._pending = b""
        self._in_utt = False
        self._utt_start = 0.0
        self._early: Transcript | None = None  # the final taken at a pause (prepare_final), until used or undone
        self._early_partial = ""
        self._early_cmn: tuple[str, str] = ("", "")

    def accept(self, chunk: AudioChunk) -> Transcript | None:
        if chunk.rate != self.sample_rate or chunk.channels != 1 or chunk.width != 2:
            raise AudioFormatError(f"pocketsphinx was set up for {self.sample_rate} Hz mono 16-bit audio, got "
                                   f"{chunk.rate} Hz, {chunk.channels} channel(s). "
                                   "Fix: read audio through demos.voice_assistant.audio.")
        if not self.own_endpointer:
            if self._early is not None:  # decoders ended at the pause: keep the audio in case speech goes on
                self._audio.append(chunk.audio)
                return Transcript(self._early_partial, is_final=False)
            if not self._in_utt:
                self._start()
                self._in_utt, self._utt_start = True, chunk.timestamp
            self._process(chunk.audio)
            return self._hypothesis(is_final=False)
        self._pending += chunk.audio
        size = self._endpointer.frame_bytes
        final: Transcript | None = None
        while len(self._pending) >= size:
            frame, self._pending = self._pending[:size], self._pending[size:]
            ended = self._feed(self._endpointer.process(frame))
            final = final or ended  # a second utterance inside one chunk waits for the next call
        if final is not None:
            return final
        return self._hypothesis(is_final=False) if self._in_utt else None

    def finalize(self) -> Transcript:
        if self._early is not None:  # taken at the pause: nothing left to decode or align
            early, self._early, self._in_utt = self._early, None, False
            return early
        if not self._in_utt:
            return Transcript("", is_final=True)
        return self._end_utt()

    def finish(self) -> Transcript:
        if not self.own_endpointer:
            return self.finalize()
        # end_stream wants a (possibly short) last frame; an empty one makes it fail, so pad with silence
        speech = self._endpointer.end_stream(self._pending or bytes(self._endpointer.frame_bytes))
        self._pending = b""
        if speech and not self._in_utt:
            self._start_utt()
        if speech:
            self._process(speech)
        if not self._in_utt:
            return Transcript("", is_final=True)
        return self._end_utt()

    def _feed(self, speech: bytes | None) -> Transcript | None:
        if speech is None:
            return None
        if not self._in_utt:
            self._start_utt()
        self._process(speech)
        return None if self._endpointer.in_speech else self._end_utt()

    def _start_utt(self) -> None:
        self._start()
        self._in_utt = True
        self._utt_start = self._endpointer.speech_start

    def _end_utt(self) -> Transcript:
        self._decoder.end_utt()
        started = time.perf_counter()
        if self._command_decoder is not None:
            self._command_decoder.end_utt()
        self._in_utt = False
        heard = self._hypothesis(is_final=True)
        return heard if self._command_decoder is None else self._route(heard, started)

    def _route(self, heard: Transcript, started: float) -> Transcript:
        """Take the command grammar's sentence when it explains the audio about as well as the open model's.

        Both sentences are force-aligned to the utterance's audio; the score is the grammar sentence's
        acoustic log-likelihood minus the open sentence's, per 10 ms frame (0: as good; a question
        forced into a command sentence scores far below). Same text: a command with no alignment; no
        grammar sentence (the search reached no sentence end), or one hassil does not take as a command
        (the grammar is a little wider than hassil: domain checks): the open path.
        """
        hyp = self._command_decoder.hyp()  # type: ignore[union-attr]
        sentence = hyp.hypstr if hyp is not None else ""
        score = self._score(heard.text, sentence)
        command = score is not None and score >= self.route_threshold
        route = CommandRoute(heard.text, sentence, None if score is None else round(score, 3), self.route_threshold,
                             command, round((time.perf_counter() - started) * 1000.0, 2))
        logger.info("heard %r, command grammar %r: score %s → %s", heard.text, sentence, score,
                    "command" if command else "open")
        if not command:
            return replace(heard, route=route)
        words = heard.words
        if words:  # the grammar's words over the span the open model heard speech in
            words = (Word(sentence, words[0].start, words[-1].end),)
        return Transcript(sentence, is_final=True, words=words, route=route)

    def prepare_final(self) -> None:
        """At a pause that sounds final, take the final now: end both decoders' utterance and route it.

        Ending the utterance and aligning the two sentences (four Viterbi passes) take ~100 ms of CPU on a
        2-core machine. Done here, during the silence the turn detector waits anyway, `finalize()` at the
        end of the turn returns at once. If the user goes on instead, `resume()` decodes the utterance
        again from its start (kept audio), so the final is the one a single pass would give. A thread
        does not help: the alignment holds the GIL and delays the audio loop just the same.
        """
        if self._command_decoder is None or self.own_endpointer or not self._in_utt or self._early is not None:
            return
        started = time.perf_counter()
        # ending an utterance adapts each decoder's cepstral mean: keep the means to undo it in resume()
        self._early_cmn = (self._decoder.get_cmn(), self._command_decoder.get_cmn())
        # until the turn ends, partials stay what they were: the words the model has already prefilled
        self._early_partial = self._hypothesis(is_final=False).text
        self._end()
        heard = self._hypothesis(is_final=True)
        routed = self._route(heard, started)
        self._early = replace(routed, route=replace(routed.route, early=True)) if routed.route else routed
        logger.debug("final taken at the pause in %.1f ms", (time.perf_counter() - started) * 1000.0)

    def resume(self) -> None:
        """Speech went on after prepare_final(): decode the whole utterance again, the new audio included."""
        if self._early is None:
            return
        self._early, audio = None, self._audio
        self._decoder.set_cmn(self._early_cmn[0])
        self._command_decoder.set_cmn(self._early_cmn[1])  # type: ignore[union-attr]
        self._start()  # both decoders start a fresh utterance (and a fresh audio list)
        for piece in audio:
            self._process(piece)

    def _score(self, open_text: str, sentence: str) -> float | None:
        """The grammar sentence's acoustic score minus the open sentence's (None: not a command candidate)."""
        if not (sentence and open_text.strip() and self._is_command(sentence)):  # no alignment is needed
            return None
        if sentence == open_text:
            return 0.0
        audio = b"".join(self._audio)
        grammar, open_ = self._acoustic(sentence, audio), self._acoustic(open_text, audio)
        return None if grammar is None or open_ is None else grammar - open_

    def _acoustic(self, text: str, audio: bytes) -> float | None:
        """Acoustic log-likelihood per frame of `text` force-aligned to `audio` (None: no alignment)."""
        aligner = self._aligner
        try:
            aligner.set_align_text(text)
            aligner.start_utt()
            aligner.process_raw(audio, False, True)
            aligner.end_utt()
            found = aligner.hyp()
            if found is None or found.hypstr.split() != text.split():  # the alignment did not reach the end
                return None
            aligner.set_alignment()
            aligner.start_utt()
            aligner.process_raw(audio, False, True)
            aligner.end_utt()
        except (RuntimeError, ValueError) as exc:  # a word the dictionary lacks, or no path through the audio
            logger.debug("no alignment of %r: %s", text, exc)
            return None
        words = list(aligner.get_alignment().words())
        frames = sum(w.duration for w in words)
        return sum(w.score for w in words) / frames if frames else None

    def _hypothesis(self, is_final: bool) -> Transcript:
        hyp = self._decoder.hyp()
        text = hyp.hypstr if hyp is not None else ""
        if not is_final:
            return Transcript(text, is_final=False)
        words = tuple(
            Word(re.sub(r"\(\d+\)$", "", seg.word), self._utt_start + seg.start_frame / FRAMES_PER_SECOND,
                 self._utt_start + (seg.end_frame + 1) / FRAMES_PER_SECOND)
            for seg in self._decoder.seg() if not _FILLERS.match(seg.word))
        return Transcript(text, is_final=True, words=words)


def pocketsphinx_vocabulary() -> Callable[[str], bool]:
    """Whether pocketsphinx's bundled US English dictionary has a word (the words a grammar may use)."""
    try:
        import pocketsphinx
    except ImportError as exc:
        raise MissingDependencyError("pocketsphinx", "dev", "the command grammar") from exc
    path = pocketsphinx.get_model_path("en-us/cmudict-en-us.dict")
    with open(path, encoding="utf-8") as f:
        words = {line.split(maxsplit=1)[0] for line in f if line.strip() and "(" not in line.split(maxsplit=1)[0]}
    return words.__contains__
