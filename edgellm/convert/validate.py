"""The quality gate of `edgellm convert`: measure the written model against its fp32 export and the source.

Checks (all through the same DecoderSession the runtime uses, and the runtime's own measurement
helpers in edgellm/runtime/measure.py, so what passes here is what runs):
- the fp32 export against the PyTorch source (catches export bugs before quantization hides them);
- KV cache consistency: logits of a prompt prefilled in one pass vs fed token by token;
- every graph that is not the fp32 reference itself (int8, or the --target cuda graph): held-out
  perplexity vs fp32, greedy next-token agreement (teacher-forced), and agreement on fp32's greedy
  chat replies;
- sizes and a short decode speed probe (recorded, not judged).
The verdict and the thresholds it used are part of the report (edgellm/validation.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ..errors import InvalidParameterError, ValidationError
from ..runtime import measure
from ..runtime.session import DecoderSession
from ..validation import ChatAgreement, GateResult, Thresholds, ValidationReport, gate_failures

CHAT_PROMPTS = [
    "How do plants make food?", "Give me a tip for better sleep.", "What is the boiling point of water?",
    "Write a haiku about rain.", "Who painted the Mona Lisa?", "How many legs does a spider have?",
    "Suggest a name for a cat.", "What is machine learning?", "Translate 'good morning' to Spanish.",
    "Why is the sky blue?", "What should I cook for dinner?", "How far is the Moon?", "What is the largest ocean?",
    "Tell me a fun fact about bees.", "How do I make tea?", "What does a CPU do?", "Name three fruits.",
    "What is the tallest mountain?", "How can I save money?", "What language is spoken in Brazil?",
]


# int4 (mixed 4/8-bit) is held to its own limits, recorded in the manifest with the verdict: 4 bits cost a small
# model more (published: Qwen2-0.5B q4_0 +7.7% perplexity). Measured on SmolLM2-135M-Instruct (this gate's text
# and windows): int4 x1.056, agreement 0.766; llama.cpp's Q4_K_M of the same weights x1.07
# (46.21 vs fp32's 43.31; benchmarks/peers_int4.json).
INT4_THRESHOLDS = Thresholds(max_ppl_ratio=1.10, min_agreement=0.70)


@dataclass(frozen=True)
class ValidationSettings:
    """How much convert measures, and the thresholds the gate holds the model to."""

    heldout_tokens: int = 2048
    window: int = 512
    consistency_tokens: int = 48
    thresholds: Thresholds = field(default_factory=Thresholds)
    int4_thresholds: Thresholds = INT4_THRESHOLDS  # what an int4 model is held to instead of `thresholds`

    def thresholds_for(self, precision: str) -> Thresholds:
        return self.int4_thresholds if precision == "int4" else self.thresholds

    def __post_init__(self) -> None:
        if self.heldout_tokens < 2 or self.window < 1 or self.consistency_tokens < 2:
            raise InvalidParameterError(f"validation settings {self} are too small: need heldout_tokens >= 2, "
                                        "window >= 1, consistency_tokens >= 2. Fix: use the defaults.")

    @property
    def sizes(self) -> dict:
        return {"heldout_tokens": self.heldout_tokens, "window": self.window,
                "consistency_tokens": self.consistency_tokens}


def chat_agreement(reference: DecoderSession, candidate: DecoderSession, prompts: list[list[int]],
                   eos_ids: set[int], max_new_tokens: int = 32) -> ChatAgreement:
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
    return ChatAgreement(prompts=len(prompts), tokens=total, agreement=round(agree / total, 4),
                         first_token_agreement=round(first / len(prompts), 4))


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.is_file())


def judge(report: ValidationReport, settings: ValidationSettings, enforced: bool) -> ValidationReport:
    """The report with its verdict; raises ValidationError (carrying the report) if it failed and `enforced`."""
    thresholds = settings.thresholds_for(report.precision)
    failures = gate_failures(report, thresholds)
    judged = replace(report, gate=GateResult(passed=not failures, enforced=enforced, failures=tuple(failures),
                                             thresholds=thresholds, settings=settings.sizes))
    if failures and enforced:
        fixes = {"fp32": "this is an export problem for this model (please report it with the source); pass "
                         "--no-gate to write it anyway",
                 "int8": "keep the fp32 model (--precision fp32), or pass --no-gate to write it anyway",
                 "int4": "use int8 (--precision int8), or pass --no-gate to write it anyway",
                 "fp16": "use the CPU graph (--target cpu), or pass --no-gate to write it anyway"}
        fix = fixes.get(report.precision, fixes["int8"])
        if report.target == "cuda" and report.precision == "int8":
            fix = "keep fp16 weights (--target cuda --precision fp16), or pass --no-gate to write it anyway"
        raise ValidationError(f"the {report.precision} model failed validation: " + "; ".join(failures)
                              + f". Fix: {fix}.", judged.to_dict())
    return judged
