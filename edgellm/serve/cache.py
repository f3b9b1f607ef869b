"""Exact-match response cache for deterministic requests (greedy, or sampling with a fixed seed).

The key is the prompt's token ids plus every resolved sampling setting, so two requests share an
entry only when the model would be asked exactly the same thing. Only complete answers are kept
(finish "stop" or "length"): a deadline or a cancel depends on timing, not on the request.
Bounded in entries and in bytes; least recently used entries go first.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import astuple, dataclass

import numpy as np

from ..runtime.sampling import ResolvedSampling

ENTRY_OVERHEAD_BYTES = 256  # key, object headers and bookkeeping, so tiny answers are not free


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    completion_tokens: int
    finish_reason: str

    @property
    def size(self) -> int:
        return len(self.text.encode("utf-8")) + ENTRY_OVERHEAD_BYTES


def is_deterministic(settings: ResolvedSampling) -> bool:
    return settings.temperature == 0 or settings.seed is not None


def cache_key(model: str, prompt_ids: Sequence[int], settings: ResolvedSampling) -> str:
    digest = hashlib.sha256(model.encode())
    digest.update(np.asarray(prompt_ids, dtype=np.int64).tobytes())
    digest.update(repr(astuple(settings)).encode())
    return digest.hexdigest()


class ResponseCache:
    """Thread-safe LRU of CachedAnswer, at most max_entries entries and max_bytes bytes."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, CachedAnswer] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> CachedAnswer | None:
        with self._lock:
            answer = self._entries.get(key)
            if answer is not None:
                self._entries.move_to_end(key)
            return answer

    def put(self, key: str, answer: CachedAnswer) -> None:
        if answer.size > self.max_bytes or self.max_entries < 1:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[key] = answer
            self._bytes += answer.size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.size
