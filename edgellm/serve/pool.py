"""A small pool of loaded models, each with its own KV cache, so interleaved conversations keep theirs.

Only the worker thread touches it (one generation at a time). Which member runs a prompt:
- one whose last prompt is a prefix of this one holds this conversation: it is used (the longest if
  several), and only the new turn is prefilled;
- any other prompt (a new conversation, or one whose member was taken over) goes to the least recently
  used member — not to the one that merely shares the system prompt, which would evict another live
  conversation to save a few tokens.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from ..errors import EdgeLLMError
from ..runtime import LLM, SamplingParams
from ..runtime.generator import common_prefix_length

logger = logging.getLogger(__name__)

WARMUP_PROMPT = "Hello"


class SessionPool:
    def __init__(self, llms: Sequence[LLM]) -> None:
        if not llms:
            raise ValueError("SessionPool needs at least one loaded LLM")
        self.llms = list(llms)
        self._last_used = [0.0] * len(self.llms)
        self._prompt_len = [0] * len(self.llms)  # length of the last prompt each member ran

    @property
    def first(self) -> LLM:
        """The member used for tokenizing and settings (all members load the same folder)."""
        return self.llms[0]

    def __len__(self) -> int:
        return len(self.llms)

    def warm_up(self) -> None:
        """One short generation per member (first-run allocations, kernel choice), then an empty cache."""
        for llm in self.llms:
            try:
                llm.generate(WARMUP_PROMPT, SamplingParams(max_new_tokens=2, temperature=0.0))
                llm.reset()
            except EdgeLLMError:
                logger.exception("warm-up failed")

    def take(self, ids: Sequence[int]) -> LLM:
        """The member to run this prompt on (see the module docstring); records that it was used."""
        index = self._choose(ids)
        self._last_used[index] = time.perf_counter()
        self._prompt_len[index] = len(ids)
        return self.llms[index]

    def _choose(self, ids: Sequence[int]) -> int:
        if len(self.llms) == 1:
            return 0
        shared = [common_prefix_length(llm.session.tokens, ids) for llm in self.llms]
        extending = [i for i in range(len(self.llms)) if self._prompt_len[i] and shared[i] >= self._prompt_len[i]]
        if extending:
            return max(extending, key=lambda i: shared[i])
        return min(range(len(self.llms)), key=lambda i: self._last_used[i])
