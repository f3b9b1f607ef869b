"""The assistant loop: audio → recognizer → (command | LLM) → text and speech, with a latency record.

Every time is taken with time.perf_counter() and reported in milliseconds after the last voiced audio
(the moment the audio holding the end of the user's last word arrived).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from .errors import VoiceError
from .intents import CommandRecognizer
from .prefill import DEFAULT_SYSTEM_PROMPT, IncrementalPrefill, user_text
from .speech import ClauseSplitter, SpeechOutput
from .stt import SpeechToText
from .types import AudioChunk, Transcript

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssistantConfig:
    """budget_ms: recognizer final → first token on screen; past it, the holding phrase is said."""

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_new_tokens: int = 64
    budget_ms: float = 200.0
    holding_phrase: str = "One moment."
    incremental: bool = True
    agree: int = 2


@dataclass(frozen=True)
class Latency:
    """Milliseconds after the last voiced audio; None where a stage did not happen."""

    recognizer_final: float
    first_token: float | None
    first_clause_spoken: float | None
    reply_done: float
    final_to_first_token: float | None


@dataclass(frozen=True)
class TurnReport:
    transcript: str
    reply: str
    route: str  # "command" (hassil), "model-command" (the intent model found one) or "llm" (free answer)
    intent: str | None
    recognizer: str
    incremental: bool
    holding_phrase: str | None  # said when the first token missed the budget
    latency_ms: Latency
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    prefills: int = 0
    finish_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Holder:
    """Says the holding phrase once if the first token has not come within the budget (a timer thread)."""

    def __init__(self, budget_ms: float, say: Callable[[], None]) -> None:
        self._lock = threading.Lock()
        self._done = False
        self.fired = False
        self._say = say
        self._timer = threading.Timer(budget_ms / 1000.0, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                self.fired = True
                self._say()

    def first_token(self) -> None:
        with self._lock:
            self._done = True
        self._timer.cancel()


class VoiceAssistant:
    """Runs utterances through the recognizer and answers each final transcript.

    on_text receives what the terminal shows (prompts, streamed reply text, holding phrase).
    """

    def __init__(self, stt: SpeechToText, llm: Any | None, commands: CommandRecognizer | None = None,
                 speech: SpeechOutput | None = None, config: AssistantConfig | None = None,
                 on_text: Callable[[str], None] | None = None, intent_model: Any | None = None) -> None:
        self.stt, self.llm, self.commands, self.speech = stt, llm, commands, speech
        self.intent_model = intent_model  # asked when hassil finds nothing (intent_model.IntentModel)
        self.config = config or AssistantConfig()
        self._show = on_text or (lambda text: None)
        self.prefill = (IncrementalPrefill(llm, self.config.system_prompt, self.config.agree, self.config.incremental)
                        if llm is not None else None)
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=600)  # (chunk end in audio s, wall time)

    def run(self, chunks: Iterable[AudioChunk]) -> Iterator[TurnReport]:
        """Answer every utterance in the audio stream, yielding one report per answered utterance."""
        self.stt.reset()
        self._begin()
        for chunk in chunks:
            self._arrivals.append((chunk.end, time.perf_counter()))
            heard = self.stt.accept(chunk)
            if heard is None:
                continue
            if not heard.is_final:
                if self.prefill is not None:
                    self.prefill.update(heard.word_list)
                continue
            if heard.text.strip():
                yield self.respond(heard, time.perf_counter())
            self._begin()
        heard = self.stt.finish()
        if heard.text.strip():
            yield self.respond(heard, time.perf_counter())

    def _begin(self) -> None:
        self._arrivals.clear()
        if self.prefill is not None:
            self.prefill.begin()

    def _last_voiced(self, heard: Transcript, final_at: float) -> float:
        end = heard.speech_end
        if end is not None:
            for chunk_end, arrived in self._arrivals:
                if chunk_end >= end - 1e-3:
                    return arrived
        return self._arrivals[-1][1] if self._arrivals else final_at

    def respond(self, heard: Transcript, final_at: float) -> TurnReport:
        """Answer one final transcript: a command when one matches, else the LLM."""
        voiced = self._last_voiced(heard, final_at)
        text = user_text(heard.word_list)
        self._show(f"you: {text}\n")
        marks: dict[str, float] = {}
        spoken = threading.Event()

        def clause_started(at: float) -> None:
            marks.setdefault("clause", at)
            spoken.set()

        def speak(clause: str) -> None:
            if self.speech is not None:
                self.speech.say(clause, clause_started)
            else:
                clause_started(time.perf_counter())

        match = self.commands.match(text) if self.commands is not None else None
        route = "command"
        if match is None and self.intent_model is not None:
            match, route = self.intent_model.match(text), "model-command"
        result, holding = None, None
        if match is not None:
            marks["token"] = time.perf_counter()
            self._show(f"assistant: {match.reply}")
            speak(match.reply)
            reply = match.reply
        elif self.llm is None:
            raise VoiceError(f"{text!r} is not a command and no model is loaded. Fix: pass an LLM to VoiceAssistant.")
        else:
            reply, result, holding = self._generate(text, marks, speak)
        done = time.perf_counter()
        self._show("\n")
        if self.speech is not None and not spoken.wait(timeout=30):
            logger.warning("speech output produced no audio within 30 s")
        ms = lambda at: None if at is None else round((at - voiced) * 1000.0, 1)  # noqa: E731
        token = marks.get("token")
        latency = Latency(ms(final_at), ms(token), ms(marks.get("clause")), ms(done),
                          None if token is None else round((token - final_at) * 1000.0, 1))
        timings = result.timings if result is not None else None
        return TurnReport(
            transcript=text, reply=reply, route=route if match else "llm",
            intent=match.intent if match else None, recognizer=self.stt.name,
            incremental=bool(self.prefill and self.prefill.enabled), holding_phrase=holding, latency_ms=latency,
            prompt_tokens=timings.prompt_tokens if timings else None,
            cached_tokens=timings.cached_tokens if timings else None,
            prefills=self.prefill.prefills if self.prefill else 0,
            finish_reason=result.finish_reason if result is not None else None)

    def _generate(self, text: str, marks: dict[str, float],
                  speak: Callable[[str], None]) -> tuple[str, Any, str | None]:
        import edgellm

        params = edgellm.SamplingParams(max_new_tokens=self.config.max_new_tokens, temperature=0.0)

        def hold() -> None:
            self._show(f"({self.config.holding_phrase}) ")
            if self.speech is not None:
                self.speech.say(self.config.holding_phrase)

        holder = _Holder(self.config.budget_ms, hold)
        splitter, parts = ClauseSplitter(), []
        self._show("assistant: ")
        try:
            stream = self.llm.stream(self.prefill.messages(text), params=params)  # type: ignore[union-attr]
            for chunk in stream:
                if "token" not in marks:
                    marks["token"] = time.perf_counter()
                    holder.first_token()
                parts.append(chunk.text)
                self._show(chunk.text)
                for clause in splitter.feed(chunk.text):
                    speak(clause)
        finally:
            holder.first_token()
        rest = splitter.flush()
        if rest:
            speak(rest)
        return "".join(parts).strip(), stream.result, self.config.holding_phrase if holder.fired else None
