"""The quality gate of `edgellm convert`: measure the int8 model against its fp32 export and the source.

Checks (all through the same DecoderSession the runtime uses, so what passes here is what runs):
- held-out perplexity fp32 vs int8, and greedy next-token agreement, teacher-forced;
- KV cache consistency: logits of a prompt prefilled in one pass vs fed token by token;
- the fp32 export against the PyTorch source (catches export bugs before quantization hides them);
- sizes and a short decode speed probe.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ValidationError
from ..runtime import measure
from ..runtime.session import DecoderSession

MAX_PPL_RATIO = 1.03
MIN_AGREEMENT = 0.90
# Token-by-token vs one-pass logits (max abs diff). fp32: float reordering only (measured 5e-5).
# int8: onnxruntime's attention takes another GEMM kernel for one query row than for several;
# the last-bit difference is blown up by MatMulNBits' int8 activation rounding downstream (on
# SmolLM2 to 1.3, the same order as either one's distance to fp32, 1.5 and 2.1), so the int8
# check also asks the argmax to agree. Graphs built --batch-invariant must match bit for bit.
# fp16 (the GPU graph, --target cuda): fp16 rounding of activations and cache.
KV_TOLERANCE = {"fp32": 2e-3, "int8": 2.5, "fp16": 0.25}
MIN_KV_ARGMAX_MATCH = 0.9


def held_out_score(session: DecoderSession, tokens: list[int], window: int) -> measure.Perplexity:
    """Teacher-forced perplexity over non-overlapping windows (each starts with an empty cache)."""
    return measure.perplexity(session, tokens, window)


def kv_consistency(session: DecoderSession, tokens: list[int]) -> dict:
    """One-pass prefill logits vs token-by-token decode logits for the same tokens."""
    return measure.kv_consistency(session, tokens).to_dict()


CHAT_PROMPTS = [
    "How do plants make food?", "Give me a tip for better sleep.", "What is the boiling point of water?",
    "Write a haiku about rain.", "Who painted the Mona Lisa?", "How many legs does a spider have?",
    "Suggest a name for a cat.", "What is machine learning?", "Translate 'good morning' to Spanish.",
    "Why is the sky blue?", "What should I cook for dinner?", "How far is the Moon?", "What is the largest ocean?",
    "Tell me a fun fact about bees.", "How do I make tea?", "What does a CPU do?", "Name three fruits.",
    "What is the tallest mountain?", "How can I save money?", "What language is spoken in Brazil?",
]


def chat_agreement(reference: DecoderSession, candidate: DecoderSession, prompts: list[list[int]],
                   eos_ids: set[int], max_new_tokens: int = 32) -> dict:
    """The reference's greedy replies to chat prompts, teacher-forced through the candidate:
    how often the candidate's argmax is the reference's token (the product's use, not prose)."""
    agree = total = first = 0
    for ids in prompts:
        reply = measure.greedy(reference, ids, max_new_tokens, eos_ids).tokens
        candidate.truncate(0)
        predicted = candidate.forward(ids + reply[:-1], keep=len(reply)).argmax(-1)
        agree += int((predicted == np.asarray(reply)).sum())
        total += len(reply)
        first += int(predicted[0] == reply[0])
    reference.truncate(0)
    candidate.truncate(0)
    return {"prompts": len(prompts), "tokens": total, "agreement": round(agree / total, 4),
            "first_token_agreement": round(first / len(prompts), 4)}


def decode_speed(session: DecoderSession, prompt: list[int], steps: int = 32) -> dict:
    """Greedy decode ms/token after a prefill (a probe, not a benchmark: see `edgellm bench`)."""
    return measure.decode_probe(session, prompt, steps).to_dict()


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def gate(report: dict, max_ppl_ratio: float = MAX_PPL_RATIO, min_agreement: float = MIN_AGREEMENT) -> list[str]:
    """Return the reasons the candidate (int8, or the GPU graph) fails, each with its numbers (empty: it passes)."""
    failures = []
    name = report.get("candidate") or "int8"
    ratio = report["perplexity_ratio"]
    if ratio > max_ppl_ratio:
        failures.append(f"{name} perplexity is {ratio:.4f}x fp32 ({report[name]['perplexity']:.3f} vs "
                        f"{report['fp32']['perplexity']:.3f}); the limit is {max_ppl_ratio}x")
    if report["greedy_agreement"] < min_agreement:
        failures.append(f"greedy agreement {name} vs fp32 is {report['greedy_agreement']:.3f}; the limit is {min_agreement}")
    for precision, check in report["kv_consistency"].items():
        worst = max(check["max_abs_diff_stepwise"], check["max_abs_diff_chunked"])
        tolerance = KV_TOLERANCE[precision]
        if worst > tolerance:
            failures.append(f"{precision} KV cache: stepwise vs one-pass logits differ by {worst:.4g} "
                            f"(tolerance {tolerance})")
        if report.get("batch_invariant") and not check.get("bit_identical"):
            failures.append(f"{precision} graph was built batch-invariant, yet stepwise and one-pass logits differ")
        if check["argmax_match"] < MIN_KV_ARGMAX_MATCH:
            failures.append(f"{precision} KV cache: stepwise vs one-pass argmax agree on {check['argmax_match']:.3f} "
                            f"of positions (limit {MIN_KV_ARGMAX_MATCH})")
    source = report.get("source_max_abs_diff")
    if source is not None and source > KV_TOLERANCE["fp32"] * 5:
        failures.append(f"fp32 ONNX logits differ from the PyTorch source by {source:.4g} (tolerance {KV_TOLERANCE['fp32'] * 5})")
    return failures


def raise_if_failed(report: dict, max_ppl_ratio: float, min_agreement: float) -> None:
    failures = gate(report, max_ppl_ratio, min_agreement)
    if failures:
        name = report.get("candidate") or "int8"
        fixes = {"int8": "keep the fp32 model (--precision fp32)", "fp16": "use the CPU graph (--target cpu)"}
        fix = "keep fp16 weights (--target cuda --precision fp16)" if report.get("target") == "cuda" and name == "int8" \
            else fixes[name]
        raise ValidationError(f"the {name} model failed validation: " + "; ".join(failures)
                              + f". Fix: {fix}, or pass --no-gate to write it anyway.", report)


@dataclass(frozen=True)
class ValidationSettings:
    heldout_tokens: int = 2048
    window: int = 512
    consistency_tokens: int = 48
    max_ppl_ratio: float = MAX_PPL_RATIO
    min_agreement: float = MIN_AGREEMENT

    def to_dict(self) -> dict:
        return asdict(self)
