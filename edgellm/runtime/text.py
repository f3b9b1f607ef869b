"""Turn a growing list of token ids into text that is always safe to show.

Two jobs, both per token:
- IncrementalDecoder: byte-level BPE tokens can end in the middle of a UTF-8 character; hold
  those back until the character is complete, and drop bytes that can never form one, so no
  replacement character (U+FFFD) leaks.
- StopMatcher: text that might be the start of a stop string is held back; once a stop
  string appears, everything from it on is dropped.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
_CONTEXT_TOKENS = 6  # tokens decoded before the new ones, so merges at the seam come out right


class IncrementalDecoder:
    """Decode only a short window each step (O(1) per token), in the style of vLLM's detokenizer."""

    def __init__(self, tokenizer: Tokenizer, context: list[int] | tuple[int, ...] = ()) -> None:
        # A few prompt tokens as context: decoders that strip a leading space (Metaspace) then
        # keep the first reply token's space.
        self.tokenizer = tokenizer
        self.tokens: list[int] = list(context[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self.tokens)

    def add(self, token_id: int) -> str:
        """Add one token; return the newly completed text ('' while a character is still partial)."""
        self.tokens.append(token_id)
        decode = self.tokenizer.decode
        prefix = decode(self.tokens[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = decode(self.tokens[self._prefix_offset:], skip_special_tokens=True)
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.tokens)
            return full[len(prefix):].replace(REPLACEMENT, "")  # bytes that can never form a character
        return ""

    def flush(self) -> str:
        """At the end, whatever is left (an incomplete character is dropped, not shown as U+FFFD)."""
        prefix = self.tokenizer.decode(self.tokens[self._prefix_offset:self._read_offset], skip_special_tokens=True)
        full = self.tokenizer.decode(self.tokens[self._prefix_offset:], skip_special_tokens=True)
        self._read_offset = len(self.tokens)
        return full[len(prefix):].replace(REPLACEMENT, "")


class StopMatcher:
    """Feed text pieces; get back what is safe to emit and whether a stop string was hit."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._held = ""
        self._longest = max((len(s) for s in stops), default=0)

    def feed(self, text: str) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        buffer = self._held + text
        hits = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buffer[:min(hits)], True
        hold = 0
        for n in range(min(self._longest - 1, len(buffer)), 0, -1):
            tail = buffer[-n:]
            if any(s.startswith(tail) for s in self.stops):
                hold = n
                break
        self._held = buffer[len(buffer) - hold:] if hold else ""
        return buffer[:len(buffer) - hold], False

    def flush(self) -> str:
        """Generation ended without a stop: the held-back text was not a stop after all."""
        held, self._held = self._held, ""
        return held
