"""Constrained output: a JSON schema, regex or Lark grammar becomes a per-token mask, via LLGuidance.

    compile   schema/regex/Lark → llguidance grammar → LLMatcher         once per constraint (cached, bounded LRU)
    start     deep copy of the compiled matcher; its first mask must allow something     at the call
    each step allowed = bits of matcher's mask over the vocab (numpy bool)             ~20-60 µs per token
              sampler picks among allowed tokens; matcher.consume_token(token)
    end       EOS is allowed only where the grammar may end; once the grammar can take nothing more
              the reply is complete (finish_reason "stop")

The bet: llguidance (Rust, used by onnxruntime-genai, llama.cpp, vLLM) computes a mask over a 49k vocab in
tens of microseconds, so constrained decoding costs well under 10% of a model step, and it reads our
tokenizer.json directly (`LLTokenizer(tokenizer.to_str())`), so no transformers is needed.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from ..errors import ConstraintError, MissingDependencyError

logger = logging.getLogger(__name__)

CACHE_SIZE = 64  # compiled grammars kept per model (each is a few kB to a few MB for large schemas)
# JSON layout the model must follow: one space after ',' and ':' (as models write it), no free whitespace —
# otherwise a small model can spend its whole budget on newlines inside an object. A schema may override
# these with its own "x-guidance" options.
JSON_DEFAULTS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
    except ImportError as exc:
        raise MissingDependencyError("llguidance", "constrained", "constrained output (json_schema, regex, grammar)") \
            from exc
    return llguidance


@dataclass(frozen=True)
class CompiledGrammar:
    kind: str          # "json_schema" | "regex" | "grammar"
    source: str        # what the caller gave (JSON text for a schema)
    compile_ms: float  # grammar text → matcher, measured once when first compiled
    matcher: object    # llguidance.LLMatcher in its start state: copied, never advanced


class Constraint:
    """One reply's grammar state. Not thread-safe; one per generation."""

    def __init__(self, compiled: CompiledGrammar, matcher, vocab_size: int) -> None:
        self.compiled = compiled
        self._matcher = matcher
        self._vocab_size = vocab_size
        self._bitmask = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
        self._pointer = self._bitmask.ctypes.data
        self._bytes = self._bitmask.nbytes
        self.mask_ms = 0.0  # time spent computing masks (for benchmarks)
        self.steps = 0
        self.consumed = 0

    def allowed(self) -> np.ndarray:
        """(vocab,) bool: the tokens that may come next (EOS included where the grammar may end)."""
        started = time.perf_counter()
        self._matcher.unsafe_compute_mask_ptr(self._pointer, self._bytes)
        allowed = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")[:self._vocab_size].view(bool)
        self.mask_ms += (time.perf_counter() - started) * 1000
        self.steps += 1
        if self._matcher.is_error() or not allowed.any():
            raise self._dead_end()
        return allowed

    def advance(self, token: int) -> None:
        if not self._matcher.consume_token(int(token)):
            raise self._dead_end()
        self.consumed += 1

    def _dead_end(self) -> ConstraintError:
        """The grammar has no way on from here: it has prefixes but no complete output reachable (e.g. a rule
        that never ends), or llguidance hit a parser limit. Found only while generating, so said clearly."""
        return ConstraintError(
            f"the {self.compiled.kind} allows no way to go on after {self.consumed} tokens, so no complete output "
            f"({_first_line(self._matcher.get_error()) or 'no token allowed'}): {_shorten(self.compiled.source)}. "
            f"Fix: make sure every part of the {self.compiled.kind} can end, and avoid very short repeated lexemes.")

    @property
    def complete(self) -> bool:
        """The grammar can take nothing more (only EOS): the reply is finished."""
        return self._matcher.is_stopped()

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` the grammar allows from here (does not advance)."""
        return self._matcher.validate_tokens(list(tokens)) if tokens else 0

    def guide_drafts(self, drafts: Sequence[int], k: int) -> list[int]:
        """Speculative drafts, checked against the grammar: the valid prefix, then the tokens the grammar forces
        after it (a JSON key, a closing brace), up to k. Only the work changes: the generator still samples
        every token itself under the mask, so the output is the same with or without this."""
        keep = list(drafts[:self.valid_prefix(drafts)])
        if len(keep) < k and self._matcher.consume_tokens(keep):
            forced = self._matcher.compute_ff_tokens()
            self._matcher.rollback(len(keep))
            keep += forced[:k - len(keep)]
        return keep


class GrammarCompiler:
    """Per model: the llguidance view of its tokenizer, and a bounded LRU of compiled grammars by source."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = CACHE_SIZE) -> None:
        llg = _llguidance()
        started = time.perf_counter()
        self._tokenizer = llg.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.tokenizer_ms = (time.perf_counter() - started) * 1000
        self.vocab_size = vocab_size
        self._eos = np.asarray([t for t in eos_token_ids if 0 <= t < vocab_size], dtype=np.int64)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        logger.debug("llguidance tokenizer ready in %.0f ms", self.tokenizer_ms)

    def compile(self, kind: str, source: str) -> CompiledGrammar:
        """Compile (or fetch from the cache) a constraint; raises ConstraintError naming what is wrong."""
        key = (kind, source)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        llg = _llguidance()
        started = time.perf_counter()
        grammar = _to_llguidance(llg, kind, source)
        matcher = llg.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ConstraintError(_explain(kind, source, matcher.get_error()))
        compiled = CompiledGrammar(kind, source, (time.perf_counter() - started) * 1000, matcher)
        logger.debug("compiled %s in %.1f ms", kind, compiled.compile_ms)
        with self._lock:
            self._cache[key] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def start(self, kind: str, source: str) -> Constraint:
        """A fresh state for one reply. Raises ConstraintError when the grammar allows no output at all."""
        compiled = self.compile(kind, source)
        constraint = Constraint(compiled, compiled.matcher.deep_copy(), self.vocab_size)
        try:
            first = constraint.allowed().copy()
            first[self._eos] = False  # only EOS allowed at the very start, and the empty reply not accepted
            dead = not first.any() and not compiled.matcher.is_accepting()
        except ConstraintError:
            dead = True
        if dead:
            raise ConstraintError(f"the {kind} allows no output at all (no text matches it): {_shorten(source)}. "
                                  f"Fix: loosen the {kind} so that some text matches it.")
        constraint.mask_ms, constraint.steps = 0.0, 0
        return constraint

    def __len__(self) -> int:
        return len(self._cache)


def _to_llguidance(llg, kind: str, source: str) -> str:
    if kind == "json_schema":
        try:
            schema = json.loads(source)
        except ValueError as exc:
            raise ConstraintError(f"json_schema is not valid JSON ({exc}): {_shorten(source)}. Fix: pass a JSON "
                                  "Schema object.") from exc
        if not isinstance(schema, (dict, bool)):
            raise ConstraintError(f"json_schema must be a JSON object (a schema), got {type(schema).__name__}: "
                                  f"{_shorten(source)}. Fix: e.g. {{\"type\": \"object\"}}.")
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
        except ValueError as exc:
            raise ConstraintError(_explain(kind, source, str(exc))) from exc
    if kind == "regex":
        return llg.LLMatcher.grammar_from_regex(source)
    if kind == "grammar":
        return llg.LLMatcher.grammar_from_lark(source)
    raise ConstraintError(f"unknown constraint kind {kind!r}; known: json_schema, regex, grammar.")


def _explain(kind: str, source: str, error: str) -> str:
    fixes = {"json_schema": "fix the schema (JSON Schema draft 2020-12 keywords as llguidance supports them)",
             "regex": "fix the regular expression (Rust regex syntax, matched against the whole reply)",
             "grammar": "fix the Lark grammar (llguidance's Lark dialect; the start rule is `start`)"}
    return f"invalid {kind}: {_first_line(error)} — in {_shorten(source)}. Fix: {fixes.get(kind, 'fix it')}."


def _first_line(error: str) -> str:
    error = error.split("<state>")[0]  # llguidance appends its parser state and the grammar
    text = " ".join(line.strip() for line in error.strip().splitlines() if line.strip().strip("^"))
    return text if len(text) <= 400 else text[:400] + "…"


def _shorten(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "…")
