"""Incremental prefill: put the user's words into the LLM's KV cache while they are still speaking.

The recognizer's final result arrives after the user stopped; by then the system prompt and every word
that stayed the same across recent partials are already cached, so only the last words and the
assistant header are left to prefill. A partial that revises cached words costs a rollback to the
longest common token prefix, which `llm.prefill` does by itself.

When every word of the latest partial is stable (the user paused), we also cache the end of the user
turn and the assistant header, betting that the pause is the end: if it is, the final result finds its
whole prompt cached and the first token costs one model step; if not, the next prefill drops those few
tokens again. Before the header goes in, the model's next-token distribution after the user's words is
free (only the last word's token is recomputed): the probability that the message ends there (next
token "?", "." or "!" or end of message) is kept as `end_probability`, a text end-of-turn signal in the
spirit of LiveKit's turn detector, from the model we already run.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

from .conversation import Conversation

logger = logging.getLogger(__name__)

SENTINEL = "\u2063user-words\u2063"  # text no recognizer produces; marks where the user's words go
DEFAULT_SYSTEM_PROMPT = ("You are a helpful voice assistant. Your answers are spoken aloud: "
                         "reply in one or two short, plain sentences, with no lists or markdown.")


def user_text(words: Sequence[str]) -> str:
    """How recognized words are written into the chat: one space between words, first letter upper case.

    The same function serves partials and the final transcript, so their tokens line up.
    """
    text = " ".join(words)
    return text[:1].upper() + text[1:]


def end_token_ids(llm: Any) -> list[int]:
    """Tokens after which the user's message is over: the model's end-of-message ids and every token that is
    only sentence-end punctuation ("?", ".", "!", "?!", " ..."). Transcripts carry no punctuation, so the
    model's "?" after "what is the capital of france" is the strongest sign the question is complete."""
    ids = set(llm.manifest.generation.eos_token_ids)
    vocab = llm.tokenizer.get_vocab()
    for token, i in vocab.items():
        bare = token.replace("\u0120", "").replace(" ", "")  # byte-level BPE writes a leading space as Ġ
        if bare and all(c in "?.!" for c in bare):
            text = llm.tokenizer.decode([i])
            if text.strip() and all(c in "?.!" for c in text.strip()):
                ids.add(i)
    return sorted(ids)


def stable_words(partials: Sequence[Sequence[str]]) -> list[str]:
    """Words every one of the given partials agrees on, from the start (their common prefix)."""
    if not partials:
        return []
    common: list[str] = []
    for column in zip(*partials, strict=False):  # stops at the shortest partial
        if any(word != column[0] for word in column):
            break
        common.append(column[0])
    return common


class IncrementalPrefill:
    """Keeps the LLM's cache in step with the words the user has said so far.

    agree: how many consecutive partials a word must appear in (at the same place) before it is cached.
    close_turn: on a pause, also cache the end of the user turn and the assistant header.
    enabled=False still caches the system prompt at the start of each utterance (any assistant does
    that between turns), so the comparison measures the user's words alone.
    """

    def __init__(self, llm: Any, system_prompt: str = DEFAULT_SYSTEM_PROMPT, agree: int = 2,
                 enabled: bool = True, close_turn: bool = True, conversation: Conversation | None = None,
                 text_signal: bool = True) -> None:
        """text_signal: on a pause, also take the model's probability that the message ends after the words."""
        self.llm, self.system_prompt, self.enabled, self.close_turn = llm, system_prompt, enabled, close_turn
        self._end_ids = end_token_ids(llm) if text_signal and enabled else None
        self.conversation = conversation  # earlier turns go in front of the user's words (None: no memory)
        self.prefix = self._user_turn_prefix()
        self._recent: deque[list[str]] = deque(maxlen=max(1, agree))
        self.committed: list[str] = []
        self.closed = False  # whether the cache also holds the end of the turn and the assistant header
        self.prefills = 0  # prefill calls made for the current utterance
        # (words, P(the message ends after them)) at the last pause; None while the words are changing
        self.end_probability: tuple[tuple[str, ...], float] | None = None

    def _user_turn_prefix(self) -> str:
        text = self.llm.render_chat(self.messages(SENTINEL), add_generation_prompt=False)
        if text.count(SENTINEL) != 1:
            raise ValueError("the chat template does not place the user's message verbatim; "
                             "incremental prefill cannot work with it. Fix: use --no-incremental.")
        return text[:text.index(SENTINEL)]

    def messages(self, user: str) -> list[dict[str, str]]:
        if self.conversation is not None:
            return self.conversation.messages(user)
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def begin(self) -> int:
        """A new utterance: forget partials, cache the chat up to the user's first word. Returns tokens cached.

        With memory, the cache still holds the last prompt and reply, so only the new turn's header is computed.
        """
        self.prefix = self._user_turn_prefix()  # the history may have changed since the last turn
        self._recent.clear()
        self.committed = []
        self.closed = False
        self.prefills = 0
        self.end_probability = None
        return self.llm.prefill(self.prefix)

    def update(self, words: Sequence[str]) -> bool:
        """Take one partial hypothesis; prefill when the stable words changed. True when it prefilled."""
        if not self.enabled:
            return False
        self._recent.append(list(words))
        if len(self._recent) < (self._recent.maxlen or 1):
            return False
        stable = stable_words(self._recent)
        closed = self.close_turn and bool(stable) and stable == self._recent[-1]
        if stable == self.committed and closed == self.closed:
            return False
        if self.committed[:len(stable)] != stable[:len(self.committed)]:
            logger.debug("partial revised %r -> %r: the cache rolls back", self.committed, stable)
        self.committed, self.closed = stable, closed
        if not closed:
            self.end_probability = None
        elif self._end_ids is not None:
            ends = self.llm.next_token_probability(self.prefix + user_text(stable), self._end_ids)
            self.end_probability = (tuple(stable), ends)
        text = (self.llm.render_chat(self.messages(user_text(stable)), add_generation_prompt=True) if closed
                else self.prefix + user_text(stable))
        cached = self.llm.prefill(text)
        self.prefills += 1
        logger.debug("prefilled %r%s (%d tokens cached)", user_text(stable), " + header" if closed else "", cached)
        return True


class BackgroundPrefill:
    """Runs IncrementalPrefill.update on its own thread, so the audio loop never waits for the model.

    post() only records the latest partial (older ones not yet prefilled are dropped: only the newest
    words matter). hold() stops taking new partials and waits until the model is free (before a
    speculative or final reply takes it); release() lets partials through again.
    """

    def __init__(self, inc: IncrementalPrefill) -> None:
        import threading

        self.inc = inc
        self._cond = threading.Condition()
        self._pending: list[str] | None = None
        self._busy = self._held = self._closed = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="prefill", daemon=True)
        self._thread.start()

    def post(self, words: Sequence[str]) -> None:
        with self._cond:
            if not self._held:
                self._pending = list(words)
                self._cond.notify_all()

    def hold(self, wait: bool = True) -> None:
        with self._cond:
            self._held, self._pending = True, None
            while wait and self._busy:
                self._cond.wait()
        if self.error is not None:
            error, self.error = self.error, None
            raise error

    def release(self) -> None:
        with self._cond:
            self._held = False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (self._pending is None or self._held):
                    self._cond.wait()
                if self._closed:
                    return
                words, self._pending, self._busy = self._pending, None, True
            try:
                self.inc.update(words)
            except Exception as exc:  # handed to the loop at its next hold()
                logger.error("incremental prefill failed: %s", exc)
                self.error = exc
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
