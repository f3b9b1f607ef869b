"""Conversation memory: earlier turns go back into the prompt, so "And of Germany?" means something.

The prompt of turn n starts with the exact text of turn n-1's prompt and reply, so the KV cache
(which still holds them) is reused and only the new user turn is prefilled. History is bounded (the
oldest exchanges are dropped, which costs one full prefill), and forgotten after an idle timeout or
when the user says "new conversation".
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from .errors import VoiceError

RESET_PHRASES = re.compile(r"\b(new conversation|start (a )?new conversation|start over|forget (it|that|everything))\b",
                           re.IGNORECASE)


@dataclass(frozen=True)
class MemoryConfig:
    """max_exchanges: user/assistant pairs kept (0 = no memory); idle_timeout: seconds without a turn."""

    max_exchanges: int = 4
    idle_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_exchanges <= 64:
            raise VoiceError(f"max_exchanges={self.max_exchanges} is out of range. Fix: use 0 to 64.")
        if not self.idle_timeout > 0:
            raise VoiceError(f"idle_timeout={self.idle_timeout} s must be > 0. Fix: pass a positive number.")


class Conversation:
    """The chat so far: a system prompt and the last few user/assistant exchanges."""

    def __init__(self, system_prompt: str, config: MemoryConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.system_prompt = system_prompt
        self.config = config or MemoryConfig()
        self._clock = clock
        self.exchanges: list[tuple[str, str]] = []
        self._last = clock()

    def messages(self, user: str) -> list[dict[str, str]]:
        """The prompt for a new user turn: system, earlier exchanges, then `user`."""
        out = [{"role": "system", "content": self.system_prompt}]
        for said, answered in self.exchanges:
            out += [{"role": "user", "content": said}, {"role": "assistant", "content": answered}]
        return out + [{"role": "user", "content": user}]

    def expire(self) -> bool:
        """Forget everything after the idle timeout; True when it did."""
        if self.exchanges and self._clock() - self._last > self.config.idle_timeout:
            self.exchanges = []
            return True
        return False

    def add(self, user: str, reply: str) -> None:
        self._last = self._clock()
        if self.config.max_exchanges == 0 or not reply:
            return
        self.exchanges.append((user, reply))
        del self.exchanges[:-self.config.max_exchanges]

    def clear(self) -> None:
        self.exchanges = []
        self._last = self._clock()


def wants_new_conversation(text: str) -> bool:
    return bool(RESET_PHRASES.search(text))
