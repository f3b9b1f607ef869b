"""Choose the next token from logits: greedy, or temperature / top-k / top-p with a repetition penalty,
among the tokens a constraint allows (if any).

numpy only. Greedy is one argmax; sampling narrows to top-k with argpartition before any
softmax, so per-token work is O(vocab) once and O(k log k) after. top_p alone is exact (no
hidden candidate cap): softmax over the whole vocabulary, then the most likely 64, 256, ...
tokens are sorted until they hold top_p of the mass, so it costs a full sort only on the rare
near-flat distribution.

Scores are (logit - max) / temperature, so any temperature > 0, however small, gives finite
probabilities (1e-310 is greedy in effect, never NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

GREEDY_BELOW = 1e-30  # temperatures this small pick the argmax (float32 logits cannot tell them from 0)
TOP_P_FIRST_CANDIDATES = 64  # top_p without top_k: sort this many first, 4x more while they hold < top_p


@dataclass(frozen=True)
class ResolvedSampling:
    """SamplingParams with the model's defaults filled in: what the sampler actually uses."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    repetition_penalty: float | None
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool = False
    constraint: tuple[str, str] | None = None  # (kind, text) of json_schema / regex / grammar; part of cache keys


class Sampler:
    def __init__(self, settings: ResolvedSampling) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int], allowed: np.ndarray | None = None) -> int:
        """logits: (vocab,); allowed: (vocab,) bool from a constraint, or None for free output."""
        s = self.settings
        if allowed is not None:  # a constraint: everything else is impossible, before penalties and top-k/top-p
            logits = np.where(allowed, logits, -np.inf)
        if s.repetition_penalty and s.repetition_penalty != 1.0 and history:
            logits = logits.copy()
            seen = np.fromiter(set(history), dtype=np.int64)
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / s.repetition_penalty, values * s.repetition_penalty)
        if s.temperature == 0:
            return int(np.argmax(logits))
        if s.top_k is not None and s.top_k < logits.shape[-1]:
            candidates = np.argpartition(logits, -s.top_k)[-s.top_k:]
            scores = logits[candidates].astype(np.float64)
            order = np.argsort(-scores)
            candidates, scores = candidates[order], scores[order]
            probs = np.exp((scores - scores[0]) / s.temperature)
            probs /= probs.sum()
        elif s.temperature < GREEDY_BELOW:
            return int(np.argmax(logits))
        else:
            weights = np.exp((logits - logits.max()) / np.float32(s.temperature))  # float32: one cheap pass
            candidates, probs = _most_likely(logits, weights, float(weights.sum(dtype=np.float64)), s.top_p)
        if s.top_p is not None and s.top_p < 1.0:
            cutoff = int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1
            candidates, probs = candidates[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
        return int(candidates[self.rng.choice(len(candidates), p=probs)])


def _most_likely(logits: np.ndarray, weights: np.ndarray, total: float,
                 top_p: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids by falling probability (weights / total), enough to hold top_p of the mass (all, unsorted, if
    top_p is None)."""
    vocab = logits.shape[-1]
    if top_p is None or top_p >= 1.0:
        return np.arange(vocab), weights.astype(np.float64) / total  # nothing is cut: no order needed
    k = min(TOP_P_FIRST_CANDIDATES, vocab)
    while True:
        candidates = np.argpartition(logits, -k)[-k:] if k < vocab else np.arange(vocab)
        probs = weights[candidates].astype(np.float64) / total
        order = np.argsort(-probs, kind="stable")
        candidates, probs = candidates[order], probs[order]
        if k == vocab or probs.sum() >= top_p:
            return candidates, probs
        k = min(k * 4, vocab)
