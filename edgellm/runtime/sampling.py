"""Choose the next token from logits: greedy, or temperature / top-k / top-p with a repetition penalty.

numpy only. Greedy is one argmax; sampling narrows to top-k with argpartition before any
softmax, so per-token work is O(vocab) once and O(k log k) after.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_SAMPLING_TOP_K = 200  # bounds per-token sorting when only top_p is set; mass past 200 is negligible


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


class Sampler:
    def __init__(self, settings: ResolvedSampling) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        s = self.settings
        if s.repetition_penalty and s.repetition_penalty != 1.0 and history:
            logits = logits.copy()
            seen = np.fromiter(set(history), dtype=np.int64)
            values = logits[seen]
            logits[seen] = np.where(values > 0, values / s.repetition_penalty, values * s.repetition_penalty)
        if s.temperature == 0:
            return int(np.argmax(logits))
        k = s.top_k or (DEFAULT_SAMPLING_TOP_K if s.top_p is not None else None)
        if k is not None and k < logits.shape[-1]:
            candidates = np.argpartition(logits, -k)[-k:]
        else:
            candidates = np.arange(logits.shape[-1])
        scores = logits[candidates].astype(np.float64) / s.temperature
        order = np.argsort(-scores)
        candidates, scores = candidates[order], scores[order]
        probs = np.exp(scores - scores[0])
        probs /= probs.sum()
        if s.top_p is not None and s.top_p < 1.0:
            cutoff = int(np.searchsorted(np.cumsum(probs), s.top_p)) + 1
            candidates, probs = candidates[:cutoff], probs[:cutoff] / probs[:cutoff].sum()
        return int(candidates[self.rng.choice(len(candidates), p=probs)])
