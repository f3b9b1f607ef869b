"""Measurements on a DecoderSession, in one place: greedy decoding, log-softmax and perplexity,
the KV-consistency check and the decode-speed probe. numpy only (no torch, no convert imports).

The convert gate (edgellm/convert/validate.py), `edgellm bench`, speculative drafting and the
scripts/ benchmarks all call these, so what the gate checks is measured exactly as the tools measure it.

Conventions: "greedy n tokens" = prefill, then n-1 one-token steps (the last token is chosen but not
fed back, as the generator does); logits are float32 as the graph returns them, and reductions over
them (log-softmax, perplexity) are done in float64.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import InvalidParameterError
from .generator import prefill
from .session import DecoderSession


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64 (stable: the max is subtracted first)."""
    x = np.asarray(logits, dtype=np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Logit of the best token minus the second best, per row (how close greedy is to a tie)."""
    x = np.asarray(logits)
    top2 = np.partition(x, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


@dataclass(frozen=True)
class Perplexity:
    """Teacher-forced perplexity; `argmax` holds the greedy prediction at every scored position."""

    perplexity: float
    tokens: int
    argmax: np.ndarray

    def to_dict(self) -> dict:
        return {"perplexity": round(self.perplexity, 4), "tokens": self.tokens}


def perplexity(session: DecoderSession, tokens: Sequence[int], window: int) -> Perplexity:
    """Teacher-forced NLL over non-overlapping windows of `window` tokens, each from an empty cache."""
    nll, count, argmax = 0.0, 0, []
    for start in range(0, len(tokens) - 1, window):
        chunk = list(tokens[start:start + window + 1])
        if len(chunk) < 2:
            break
        session.truncate(0)
        logits = session.forward(chunk[:-1], keep=len(chunk) - 1)
        logp = log_softmax(logits)
        targets = np.asarray(chunk[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        argmax.append(logits.argmax(-1))
    session.truncate(0)
    if count == 0:
        raise InvalidParameterError(f"perplexity needs at least 2 tokens, got {len(tokens)}. Fix: score a longer text.")
    return Perplexity(float(np.exp(nll / count)), count, np.concatenate(argmax))


@dataclass(frozen=True)
class GreedyRun:
    """What `greedy` produced. tokens include a final end-of-sequence token if one was chosen.

    margins (steps,) and logits (steps, vocab) are filled only when asked for (record=True);
    row i belongs to the choice of tokens[i]."""

    tokens: list[int]
    prefill_ms: float
    decode_ms: float          # the one-token steps after the prefill, together
    steps: int                # one-token steps run (len(tokens) - 1)
    reused: int = 0           # prompt tokens found in the cache (reuse_cache=True)
    margins: np.ndarray | None = None
    logits: np.ndarray | None = None

    @property
    def decode_ms_per_token(self) -> float:
        return self.decode_ms / self.steps if self.steps else float("nan")


def greedy(session: DecoderSession, prompt: Sequence[int], max_new_tokens: int,
           eos_token_ids: Collection[int] = (), *, reuse_cache: bool = False, record: bool = False) -> GreedyRun:
    """Greedy (argmax) continuation of `prompt` for up to max_new_tokens tokens, stopping after an EOS id.

    reuse_cache=False starts from an empty cache; True keeps the longest cached prefix of `prompt`
    (speculative drafting). The cache is left holding the prompt and every token fed back.
    record=True also returns each step's top-2 margin and a copy of its logits.
    """
    if max_new_tokens < 1:
        raise InvalidParameterError(f"max_new_tokens={max_new_tokens} must be at least 1. Fix: ask for 1 or more tokens.")
    eos = frozenset(eos_token_ids)
    if not reuse_cache:
        session.truncate(0)
    started = time.perf_counter()
    logits, reused = prefill(session, list(prompt))
    prefill_done = time.perf_counter()
    tokens: list[int] = []
    rows: list[np.ndarray] = []
    while True:
        if record:
            rows.append(np.array(logits, dtype=np.float32).reshape(-1))
        token = int(np.argmax(logits))
        tokens.append(token)
        if len(tokens) == max_new_tokens or token in eos:
            break
        logits = session.forward((token,), keep=1)[0]
    decode_ms = (time.perf_counter() - prefill_done) * 1000
    recorded = np.stack(rows) if record else None
    return GreedyRun(tokens, (prefill_done - started) * 1000, decode_ms, len(tokens) - 1, reused,
                     top2_margin(recorded) if record else None, recorded)


@dataclass(frozen=True)
class KVConsistency:
    """Logits of one prompt computed three ways: one pass, token by token, and in two chunks."""

    tokens: int
    max_abs_diff_stepwise: float   # one pass vs token by token
    max_abs_diff_chunked: float    # one pass vs first half then second half
    argmax_match: float            # fraction of positions where one pass and token by token pick the same token
    bit_identical: bool

    @property
    def worst(self) -> float:
        return max(self.max_abs_diff_stepwise, self.max_abs_diff_chunked)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "KVConsistency":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def kv_consistency(session: DecoderSession, tokens: Sequence[int]) -> KVConsistency:
    """One-pass prefill logits vs token-by-token decode logits (and a two-chunk prefill) for the same tokens."""
    tokens = list(tokens)
    if len(tokens) < 2:
        raise InvalidParameterError(f"kv_consistency needs at least 2 tokens, got {len(tokens)}. Fix: check a longer prompt.")
    session.truncate(0)
    full = session.forward(tokens, keep=len(tokens)).copy()
    session.truncate(0)
    steps = np.stack([session.forward([t], keep=1)[0].copy() for t in tokens])
    half = len(tokens) // 2
    session.truncate(0)
    session.forward(tokens[:half], keep=1)
    chunked = session.forward(tokens[half:], keep=len(tokens) - half).copy()
    session.truncate(0)
    return KVConsistency(
        tokens=len(tokens),
        max_abs_diff_stepwise=float(np.abs(full - steps).max()),
        max_abs_diff_chunked=float(np.abs(full[half:] - chunked).max()),
        argmax_match=float((full.argmax(-1) == steps.argmax(-1)).mean()),
        bit_identical=bool(np.array_equal(full, steps) and np.array_equal(full[half:], chunked)),
    )


@dataclass(frozen=True)
class DecodeProbe:
    """Greedy decode speed through the bare session (no sampling, no detokenizing): a probe, not a benchmark."""

    prompt_tokens: int
    prefill_ms: float
    decode_ms_per_token: float
    steps: int

    def to_dict(self) -> dict:
        return {"prefill_ms": round(self.prefill_ms, 2), "prompt_tokens": self.prompt_tokens,
                "decode_ms_per_token": round(self.decode_ms_per_token, 2), "steps": self.steps}

    @classmethod
    def from_dict(cls, data: dict) -> "DecodeProbe":
        return cls(prompt_tokens=data["prompt_tokens"], prefill_ms=data["prefill_ms"],
                   decode_ms_per_token=data["decode_ms_per_token"], steps=data.get("steps", 32))


def decode_probe(session: DecoderSession, prompt: Sequence[int], steps: int = 32) -> DecodeProbe:
    """Prefill `prompt` from an empty cache, then `steps` greedy one-token steps; the cache is emptied after."""
    run = greedy(session, prompt, steps + 1)
    session.truncate(0)
    return DecodeProbe(len(prompt), run.prefill_ms, run.decode_ms_per_token, run.steps)


__all__ = ["log_softmax", "top2_margin", "Perplexity", "perplexity", "GreedyRun", "greedy", "KVConsistency",
           "kv_consistency", "DecodeProbe", "decode_probe"]
