"""Incremental prefill: put the user's words into the LLM's KV cache while they are still speaking.

The recognizer's final result arrives after the user stopped; by then the system prompt and every word
that stayed the same across recent partials are already cached, so only the last words and the
assistant header are left to prefill. A partial that revises cached words costs a rollback to the
longest common token prefix, which `llm.prefill` does by itself.

When every word of the latest partial is stable (the user paused), we also cache the end of the user
turn and the assistant header, betting that the pause is the end: if it is, the final result finds its
whole prompt cached and the first token costs one model step; if not, the next prefill drops those few
tokens again.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

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
                 enabled: bool = True, close_turn: bool = True) -> None:
        self.llm, self.system_prompt, self.enabled, self.close_turn = llm, system_prompt, enabled, close_turn
        self.prefix = self._user_turn_prefix()
        self._recent: deque[list[str]] = deque(maxlen=max(1, agree))
        self.committed: list[str] = []
        self.closed = False  # whether the cache also holds the end of the turn and the assistant header
        self.prefills = 0  # prefill calls made for the current utterance

    def _user_turn_prefix(self) -> str:
        text = self.llm.render_chat(self.messages(SENTINEL), add_generation_prompt=False)
        if text.count(SENTINEL) != 1:
            raise ValueError("the chat template does not place the user's message verbatim; "
                             "incremental prefill cannot work with it. Fix: use --no-incremental.")
        return text[:text.index(SENTINEL)]

    def messages(self, user: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]

    def begin(self) -> int:
        """A new utterance: forget partials, cache the chat up to the user's first word. Returns tokens cached."""
        self._recent.clear()
        self.committed = []
        self.closed = False
        self.prefills = 0
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
        text = (self.llm.render_chat(self.messages(user_text(stable)), add_generation_prompt=True) if closed
                else self.prefix + user_text(stable))
        cached = self.llm.prefill(text)
        self.prefills += 1
        logger.debug("prefilled %r%s (%d tokens cached)", user_text(stable), " + header" if closed else "", cached)
        return True
