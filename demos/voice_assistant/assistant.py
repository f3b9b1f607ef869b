"""The assistant loop: audio → recognizer → (command | LLM) → text and speech, with a latency record.

Every time is taken with time.perf_counter() and reported in milliseconds after the last voiced audio
(the moment the audio holding the end of the user's last word arrived).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .claims import ClaimGuard, GuardedReply
from .conversation import Conversation, MemoryConfig, wants_new_conversation
from .errors import VoiceError
from .intents import CommandRecognizer
from .prefill import DEFAULT_SYSTEM_PROMPT, BackgroundPrefill, IncrementalPrefill, user_text
from .speculate import Speculation
from .speech import FIRST_WORDS, ClauseSplitter, SpeechOutput
from .stt import SpeechToText
from .turn import ENDPOINTING, TurnConfig, TurnDetector, TurnEvent
from .types import AudioChunk, Transcript

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssistantConfig:
    """budget_ms: recognizer final → first token on screen; past it, the holding phrase is said.

    endpointing: "smart" (Silero VAD + Smart Turn decide when the turn ends), "silence" (VAD + a fixed
    silence), "recognizer" (the recognizer's own endpointer, as before turn-taking existed).
    speculative: start the reply in the background at a pause that sounds final.
    text_turn: with "smart", the model's probability that the user's words so far end the message is a
    second end-of-turn opinion next to Smart Turn's (needs incremental prefill; see turn.TurnDetector).
    first_words: the reply's first words are spoken once this many are written (0: at the first clause's end).
    """

    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    max_new_tokens: int = 64
    budget_ms: float = 200.0
    holding_phrase: str = "One moment."
    incremental: bool = True
    agree: int = 2
    endpointing: str = "smart"
    speculative: bool = False  # measured: it did not pay on a loaded 2-core machine (bench_voice.py)
    text_turn: bool = True
    first_words: int = FIRST_WORDS
    barge_in: bool = True  # speech while the assistant answers stops the answer (use headphones with --speak)
    turn: TurnConfig = field(default_factory=TurnConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    new_conversation_reply: str = "Okay, let's start a new conversation."
    guard_claims: bool = True  # model replies may not claim a device action (claims.py)

    def __post_init__(self) -> None:
        if self.endpointing not in ("recognizer", *ENDPOINTING):
            raise VoiceError(f"endpointing {self.endpointing!r} is not known. "
                             f"Fix: use recognizer, {', '.join(ENDPOINTING)}.")
        if self.endpointing != "recognizer" and self.turn.endpointing != self.endpointing:
            object.__setattr__(self, "turn", replace(self.turn, endpointing=self.endpointing))


@dataclass(frozen=True)
class Latency:
    """Milliseconds after the last voiced audio (the VAD's, or the recognizer's last word when it ends
    turns itself); None where a stage did not happen."""

    end_of_turn: float
    recognizer_final: float
    first_token: float | None
    first_audio: float | None
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
    endpointing: str = "recognizer"
    end_reason: str | None = None  # complete / incomplete / silence / max_length / end_of_audio / recognizer
    turn_probability: float | None = None  # Smart Turn's score at the last pause
    text_probability: float | None = None  # the LLM's P(message ends here) after the words, at the decision
    silence_ms: float | None = None  # audio time the detector waited after the last voiced audio (load-free)
    end_at_s: float | None = None  # stream audio time (s) at which the turn was declared over
    speculative: bool = False  # the reply had been started before the turn ended, and was used
    speculations_cancelled: int = 0  # background replies dropped because the user went on
    speculations_restarted: int = 0  # guesses replaced because the recognizer's words changed in the pause
    history_exchanges: int = 0  # earlier exchanges in this turn's prompt
    heard: Any = None  # types.CommandRoute: what the open model and the command grammar heard, and the choice
    claim_blocked: bool = False  # the model's reply claimed a device action and was replaced by an honest line
    interrupted: bool = False  # the user barged in: generation and speech were stopped
    barge_in_ms: float | None = None  # from the user's first voiced audio to generation and speech stopped
    barge_in_detected_ms: float | None = None  # of which: until the VAD confirmed the speech (2 windows)
    barge_in_at_s: float | None = None  # stream audio time where the VAD found the interrupting speech's onset

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



@dataclass
class _Turn:
    """What the loop learned about the current turn before it was answered."""

    voiced: float | None = None  # wall time when the audio holding the last voiced sample arrived
    decided: float | None = None  # wall time of the end-of-turn decision
    reason: str | None = None
    probability: float | None = None
    text_probability: float | None = None
    silence: float | None = None  # seconds of audio between the last voiced audio and the decision
    at: float | None = None  # stream audio time of the decision
    speculation: Speculation | None = None
    cancelled: int = 0
    restarted: int = 0  # guesses replaced because the recognizer's words changed during the pause
    sounds_final: bool = False


@dataclass
class _Reply:
    """A reply being generated and spoken on its own thread, so the loop can hear a barge-in."""

    cancel: Any  # edgellm.CancelToken
    thread: threading.Thread = field(default=None)  # type: ignore[assignment]
    stopped: threading.Event = field(default_factory=threading.Event)  # generation over and speech done or cut
    barge_in_ms: float | None = None  # from the user's first voiced audio to reply and speech stopped
    detected_ms: float | None = None  # of which: until the VAD confirmed it
    onset_s: float | None = None  # stream audio time of the interrupting speech's onset


class VoiceAssistant:
    """Runs utterances through the recognizer and answers each final transcript.

    on_text receives what the terminal shows (prompts, streamed reply text, holding phrase).
    turns: the end-of-turn detector (built from config.turn unless given; None with endpointing="recognizer").
    """

    def __init__(self, stt: SpeechToText, llm: Any | None, commands: CommandRecognizer | None = None,
                 speech: SpeechOutput | None = None, config: AssistantConfig | None = None,
                 on_text: Callable[[str], None] | None = None, turns: TurnDetector | None = None,
                 intent_model: Any | None = None) -> None:
        self.stt, self.llm, self.commands, self.speech = stt, llm, commands, speech
        self.intent_model = intent_model  # asked when hassil finds nothing (intent_model.IntentModel)
        self.config = config or AssistantConfig()
        self.claims = ClaimGuard(commands) if self.config.guard_claims else None
        self._show = on_text or (lambda text: None)
        self.conversation = Conversation(self.config.system_prompt, self.config.memory)
        text_signal = self.config.text_turn and self.config.endpointing == "smart"
        self.prefill = (IncrementalPrefill(llm, self.config.system_prompt, self.config.agree, self.config.incremental,
                                           conversation=self.conversation, text_signal=text_signal)
                        if llm is not None else None)
        self.turns = None
        if self.config.endpointing != "recognizer":
            self.turns = turns if turns is not None else TurnDetector(self.config.turn)
        # with turn-taking, partials are prefilled on a thread: the audio loop (VAD, end of turn) never waits
        self._worker = BackgroundPrefill(self.prefill) if self.prefill is not None and self.turns else None
        self._arrivals: deque[tuple[float, float]] = deque(maxlen=2000)  # (chunk end in audio s, wall time)
        self._turn = _Turn()
        self._reply: _Reply | None = None

    # --- the loop -------------------------------------------------------------------------------

    def run(self, chunks: Iterable[AudioChunk]) -> Iterator[TurnReport]:
        """Answer every turn in the audio stream, yielding one report per answered turn."""
        if self.turns is None:
            yield from self._run_recognizer(chunks)
            return
        turns, pre_roll = self.turns, self.config.turn.pre_roll
        self.stt.use_own_endpointer(False)
        turns.reset()
        self.begin_turn()
        self._reply = None
        self._replies: queue.Queue[tuple[_Reply, Any]] = queue.Queue()
        recent: deque[AudioChunk] = deque()  # audio before the turn started: the recognizer hears it too
        words: list[str] = []
        end = 0.0
        try:
            for chunk in chunks:
                self._arrivals.append((chunk.end, chunk.available or time.perf_counter()))
                end = chunk.end
                was_in_turn = turns.in_turn
                turns.text_probability = self._text_end(words)
                events = turns.feed(chunk)
                decided = time.perf_counter()
                start = next((e for e in events if e.kind == "start"), None)
                if start is not None:
                    if self.config.barge_in and self._reply is not None and self._reply.thread.is_alive():
                        self._reply.onset_s = start.at
                        self._interrupt(self._arrival(start.at) or decided, decided)
                    for old in recent:
                        if old.end > start.at - pre_roll:
                            words = self._hear(old) or words
                    recent.clear()
                if was_in_turn or events:
                    words = self._hear(chunk) or words
                    self._catch_up(words)
                else:
                    recent.append(chunk)
                    while recent and recent[0].end < chunk.end - pre_roll - 0.1:
                        recent.popleft()
                for event in events:
                    if event.kind == "pause":
                        self._paused(event, words)
                    elif event.kind == "resume":
                        self._cancel_speculation()
                        resume = getattr(self.stt, "resume", None)  # undo a final taken at the pause
                        if resume is not None:
                            resume()
                    elif event.kind == "end":
                        self._end_turn(event, decided)
                        words = []
                yield from self._answered()
            for event in turns.finish(end):
                self._end_turn(event, time.perf_counter())
        finally:
            if self._reply is not None:
                self._reply.thread.join()
            self._cancel_speculation()
            self.stt.use_own_endpointer(True)  # hand the recognizer back as it was given
        yield from self._answered()

    def _end_turn(self, event: TurnEvent, decided: float) -> None:
        """The detector ended the turn: take the recognizer's final and answer it on the reply thread."""
        turn = self._turn
        if self.conversation.expire():
            logger.info("conversation forgotten after %.0f s idle", self.config.memory.idle_timeout)
        turn.voiced = self._arrival(event.last_voiced)
        turn.decided, turn.reason, turn.at = decided, event.reason, event.at
        turn.text_probability = None if event.text_probability is None else round(event.text_probability, 4)
        turn.silence = None if event.last_voiced is None else event.at - event.last_voiced
        heard = self.stt.finalize()
        final_at = time.perf_counter()
        if not heard.text.strip():
            self._cancel_speculation()
            if self._reply is None or not self._reply.thread.is_alive():
                self.begin_turn()
            return
        if self._reply is not None:
            self._reply.thread.join()  # one reply at a time (without barge-in, the user waits it out)
        self._turn = _Turn()  # the next turn's marks; the reply thread keeps `turn`
        import edgellm

        reply = _Reply(edgellm.CancelToken())

        def work() -> None:
            try:
                result: Any = self.respond(heard, final_at, turn=turn, cancel=reply.cancel)
            except BaseException as exc:  # handed to the loop, which raises it
                result = exc
            reply.stopped.set()
            try:
                self._ready_for_next_turn()
            finally:
                self._replies.put((reply, result))

        reply.thread = threading.Thread(target=work, name="reply", daemon=True)
        self._reply = reply
        reply.thread.start()

    def _interrupt(self, onset: float, detected: float) -> None:
        """Barge-in: the user speaks while the reply is generated or spoken. Stop both, then listen.

        onset: when the audio where the user started speaking arrived; detected: when the VAD said so.
        """
        reply = self._reply
        assert reply is not None
        reply.cancel.cancel()
        if self.speech is not None:
            self.speech.stop(wait=1.0)  # no audio of the reply written or played after this
        reply.stopped.wait()  # the reply thread then caches the next turn's prefix; the loop goes on listening
        reply.barge_in_ms = round((time.perf_counter() - onset) * 1000.0, 1)
        reply.detected_ms = round((detected - onset) * 1000.0, 1)
        logger.info("barge-in: reply stopped %.0f ms after the user started speaking", reply.barge_in_ms)

    def _answered(self) -> Iterator[TurnReport]:
        while True:
            try:
                reply, result = self._replies.get_nowait()
            except queue.Empty:
                return
            if isinstance(result, BaseException):
                raise result
            if reply.barge_in_ms is not None:
                result = replace(result, interrupted=True, barge_in_ms=reply.barge_in_ms,
                                 barge_in_detected_ms=reply.detected_ms, barge_in_at_s=reply.onset_s)
            yield result

    def _ready_for_next_turn(self) -> None:
        """After a reply: cache the next turn's prompt prefix (now with this exchange) and let partials in."""
        if self.prefill is not None:
            self._hold()
            if self._turn.speculation is None:
                self.prefill.begin()
            if self._worker is not None and self._turn.speculation is None:
                self._worker.release()

    def _run_recognizer(self, chunks: Iterable[AudioChunk]) -> Iterator[TurnReport]:
        """The recognizer's own endpointer ends each utterance (the behaviour before turn-taking)."""
        self.stt.use_own_endpointer(True)
        self.begin_turn()
        for chunk in chunks:
            self._arrivals.append((chunk.end, chunk.available or time.perf_counter()))
            heard = self.stt.accept(chunk)
            if heard is None:
                continue
            if not heard.is_final:
                if self.prefill is not None:
                    self.prefill.update(heard.word_list)
                continue
            if heard.text.strip():
                yield self.respond(heard, time.perf_counter())
            self.begin_turn()
        heard = self.stt.finish()
        if heard.text.strip():
            yield self.respond(heard, time.perf_counter())

    def _hear(self, chunk: AudioChunk) -> list[str] | None:
        """Feed the recognizer; a partial updates the cache (unless a speculative reply owns the model)."""
        heard = self.stt.accept(chunk)
        if heard is None or heard.is_final:
            return None
        if self._worker is not None and self._turn.speculation is None:
            self._worker.post(heard.word_list)
        return heard.word_list

    def _paused(self, event: TurnEvent, words: list[str]) -> None:
        self._turn.probability = event.probability
        self._turn.sounds_final = event.complete if event.complete is not None else True
        if self._turn.sounds_final and self._turn.speculation is None:
            self._speculate(words)
        if self._turn.sounds_final:  # take the final now, during the silence waited anyway
            prepare = getattr(self.stt, "prepare_final", None)  # pocketsphinx with the command grammar
            if prepare is not None:
                prepare()

    def _text_end(self, words: list[str]) -> float | None:
        """The model's P(the message ends) after exactly the latest partial's words, once it is known."""
        known = self.prefill.end_probability if self.prefill is not None else None
        return known[1] if known is not None and words and known[0] == tuple(words) else None

    def _speculate(self, words: list[str]) -> None:
        if not (self.config.speculative and words and self.llm is not None):
            return
        text = user_text(words)
        if wants_new_conversation(text) or (self.commands is not None and self.commands.match(text) is not None):
            return  # a command's answer costs nothing: no need to guess it early
        if self._worker is not None:
            self._worker.hold(wait=False)  # no new partials; one in flight finishes first (the model's lock)
        self._turn.speculation = Speculation(self.llm, self.prefill.messages(text), text,  # type: ignore[union-attr]
                                             self._params())

    def _catch_up(self, words: list[str]) -> None:
        """The recognizer's partial lags the audio: when its words change during the pause, guess again."""
        spec = self._turn.speculation
        if spec is not None and words and user_text(words) != spec.user and self.turns is not None \
                and self.turns.paused:
            spec.cancel()
            self._turn.speculation = None
            self._turn.restarted += 1
            self._speculate(words)

    def _cancel_speculation(self, turn: _Turn | None = None) -> None:
        turn = turn if turn is not None else self._turn
        if turn.speculation is not None:
            turn.speculation.cancel()
            turn.speculation = None
            turn.cancelled += 1
            if self._worker is not None and turn is self._turn:
                self._worker.release()

    def _hold(self) -> None:
        """Wait until no partial is being prefilled, and take no more: the model is about to answer."""
        if self._worker is not None:
            self._worker.hold()

    def _finalize(self) -> TurnReport | None:
        heard = self.stt.finalize()
        final_at = time.perf_counter()
        if not heard.text.strip():
            self._cancel_speculation()
            return None
        return self.respond(heard, final_at)

    def begin_turn(self) -> None:
        """Get ready for a new turn: forget the last one's marks, cache the prompt up to the user's words."""
        self._arrivals.clear()
        self._turn = _Turn()
        if self.conversation.expire():
            logger.info("conversation forgotten after %.0f s idle", self.config.memory.idle_timeout)
        if self.prefill is not None:
            self._hold()
            self.prefill.begin()
            if self._worker is not None:
                self._worker.release()

    def _arrival(self, audio_time: float | None) -> float | None:
        if audio_time is not None:
            for chunk_end, arrived in self._arrivals:
                if chunk_end >= audio_time - 1e-3:
                    return arrived
        return None

    def _last_voiced(self, heard: Transcript, final_at: float, turn: _Turn) -> float:
        if turn.voiced is not None:
            return turn.voiced
        arrived = self._arrival(heard.speech_end)
        if arrived is not None:
            return arrived
        return self._arrivals[-1][1] if self._arrivals else final_at

    def _params(self) -> Any:
        import edgellm

        return edgellm.SamplingParams(max_new_tokens=self.config.max_new_tokens, temperature=0.0)

    # --- answering ------------------------------------------------------------------------------

    def respond(self, heard: Transcript, final_at: float, turn: _Turn | None = None,
                cancel: Any | None = None) -> TurnReport:
        """Answer one final transcript: a command when one matches, else the LLM.

        turn: what the loop learned about this turn (default: the current one); cancel: a CancelToken
        that stops the reply (barge-in).
        """
        turn = turn if turn is not None else self._turn
        voiced = self._last_voiced(heard, final_at, turn)
        decided = turn.decided or final_at
        text = user_text(heard.word_list)
        self._show(f"you: {text}\n")
        marks: dict[str, float] = {}
        spoken = threading.Event()
        history = len(self.conversation.exchanges)

        def clause_started(at: float) -> None:
            marks.setdefault("clause", at)
            spoken.set()

        def speak(clause: str) -> None:
            if self.speech is not None:
                self.speech.say(clause, clause_started)
            else:
                clause_started(time.perf_counter())

        speculation = turn.speculation
        if speculation is not None and speculation.user != text:
            logger.debug("speculated on %r, the final is %r: discarded", speculation.user, text)
            self._cancel_speculation(turn)
            speculation = None
        new_conversation = wants_new_conversation(text)
        match = None if new_conversation else self.commands.match(text) if self.commands is not None else None
        route = "command"
        if match is None and not new_conversation and self.intent_model is not None:
            self._cancel_speculation(turn)  # the intent model needs the model, which a waiting guess holds
            speculation = None
            self._hold()
            match, route = self.intent_model.match(text), "model-command"
        result, holding = None, None
        if new_conversation or match is not None:
            reply = self.config.new_conversation_reply if new_conversation else match.reply  # type: ignore[union-attr]
            marks["token"] = time.perf_counter()
            self._show(f"assistant: {reply}")
            speak(reply)
            self._cancel_speculation(turn)  # after the answer: a command never waits for the model
            speculation = None
            if new_conversation:
                self.conversation.clear()
        elif self.llm is None:
            raise VoiceError(f"{text!r} is not a command and no model is loaded. Fix: pass an LLM to VoiceAssistant.")
        else:
            turn.speculation = None  # from here on the reply is this turn's, used or not
            reply, result, holding = self._generate(text, marks, speak, speculation, cancel)
            self.conversation.add(text, reply)
        done = time.perf_counter()
        self._show("\n")
        if self.speech is not None:
            waited = time.perf_counter()
            while not spoken.wait(timeout=0.02) and not (cancel is not None and cancel.cancelled):
                if time.perf_counter() - waited > 30:
                    logger.warning("speech output produced no audio within 30 s")
                    break
            # on the reply thread, the turn lasts until the reply is spoken (or the user barges in)
            while cancel is not None and self.speech.busy and not cancel.cancelled:
                time.sleep(0.01)
        ms = lambda at: None if at is None else round((at - voiced) * 1000.0, 1)  # noqa: E731
        token = marks.get("token")
        latency = Latency(ms(decided), ms(final_at), ms(token), ms(marks.get("clause")), ms(done),  # type: ignore[arg-type]
                          None if token is None else round((token - final_at) * 1000.0, 1))
        timings = result.timings if result is not None else None
        return TurnReport(
            transcript=text, reply=reply, route=route if match else "command" if new_conversation else "llm",
            intent="NewConversation" if new_conversation else match.intent if match else None,
            recognizer=self.stt.name, incremental=bool(self.prefill and self.prefill.enabled), holding_phrase=holding,
            latency_ms=latency, prompt_tokens=timings.prompt_tokens if timings else None,
            cached_tokens=timings.cached_tokens if timings else None,
            prefills=self.prefill.prefills if self.prefill else 0,
            finish_reason=result.finish_reason if result is not None else None,
            endpointing=self.config.endpointing, end_reason=turn.reason or "recognizer",
            turn_probability=turn.probability, text_probability=turn.text_probability,
            silence_ms=None if turn.silence is None else round(turn.silence * 1000.0, 1),
            end_at_s=None if turn.at is None else round(turn.at, 3), speculative=speculation is not None,
            speculations_cancelled=turn.cancelled, speculations_restarted=turn.restarted, history_exchanges=history,
            heard=heard.route, claim_blocked="claim_blocked" in marks)

    def _generate(self, text: str, marks: dict[str, float], speak: Callable[[str], None],
                  speculation: Speculation | None, cancel: Any | None = None) -> tuple[str, Any, str | None]:
        def hold() -> None:
            self._show(f"({self.config.holding_phrase}) ")
            if self.speech is not None:
                self.speech.say(self.config.holding_phrase)

        holder = _Holder(self.config.budget_ms, hold)
        splitter, parts = ClauseSplitter(self.config.first_words), []
        guarded = self.claims.reply() if self.claims is not None else None
        self._show("assistant: ")
        stream = None
        try:
            if speculation is not None:
                chunks: Iterable[Any] = speculation.take()
            else:
                self._hold()
                stream = self.llm.stream(self.prefill.messages(text), params=self._params(),  # type: ignore[union-attr]
                                         cancel=cancel)
                chunks = stream
            for chunk in chunks:
                if cancel is not None and cancel.cancelled:
                    if speculation is not None:
                        speculation.cancel()
                    break
                if "token" not in marks:
                    marks["token"] = time.perf_counter()
                    holder.first_token()
                parts.append(chunk.text)
                if guarded is None:
                    self._show(chunk.text)
                for clause in splitter.feed(chunk.text):
                    self._say(clause, guarded, speak)
                if guarded is not None and guarded.blocked:  # nothing more of this reply is said
                    marks["claim_blocked"] = time.perf_counter()
                    speculation.cancel() if speculation is not None else stream.close()  # type: ignore[union-attr]
                    break
        finally:
            holder.first_token()
        rest = splitter.flush()
        if (rest or guarded is not None) and not (cancel is not None and cancel.cancelled):
            self._say(rest or "", guarded, speak, last=True)
        result = speculation.result if speculation is not None else stream.result  # type: ignore[union-attr]
        text = guarded.text if guarded is not None and guarded.blocked else "".join(parts).strip()
        return text, result, self.config.holding_phrase if holder.fired else None

    def _say(self, clause: str, guarded: GuardedReply | None, speak: Callable[[str], None], last: bool = False) -> None:
        """Show and speak a clause of a model reply, once the claim guard has passed it."""
        if guarded is not None:
            said = guarded.clause(clause, last)
            if not said:
                return
            self._show(f"{said} ")
            clause = said
        speak(clause)
