"""The convert gate's report, typed: what was measured, the thresholds it was held to, and the verdict.

`edgellm convert` builds a ValidationReport (edgellm/convert/validate.py measures, `gate_failures`
judges); it becomes a dict only when the manifest is written, and `ValidationReport.from_dict` reads
it back (the runtime, `edgellm info`, tests). The gate runs for every precision: fp32 is held to the
PyTorch source (logit difference) and to KV-cache consistency; int8 also to fp32 (perplexity ratio,
greedy agreement). So `gate.passed` always means "checked against these recorded thresholds".

Torch-free: the JSON layout is that of the manifest's "validation" object.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ModelFormatError
from .runtime.measure import DecodeProbe, KVConsistency

_FIX = "Fix: re-run `edgellm convert` to write a fresh model folder."


def _bad(where: str, value: Any, expected: str) -> ModelFormatError:
    return ModelFormatError(f"manifest field {where}={value!r} is invalid: it must be {expected}. {_FIX}")


def _obj(data: Any, where: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise _bad(where, data, "a JSON object")
    return data


def _get(data: Mapping, where: str, name: str, kind: type) -> Any:
    """data[name] checked against kind (float accepts ints; bool is not a number)."""
    value = data.get(name)
    ok = isinstance(value, bool) if kind is bool else (
        isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
        isinstance(value, kind) and not isinstance(value, bool))
    if not ok:
        raise _bad(f"{where}.{name}", value, {bool: "true or false", float: "a number", int: "an integer",
                                              str: "a string"}[kind])
    return float(value) if kind is float else value


def _simple(cls, data: Any, where: str):
    """A dataclass of scalar fields from its dict, every field checked."""
    data = _obj(data, where)
    kinds = {"int": int, "float": float, "bool": bool, "str": str}
    return cls(**{f.name: _get(data, where, f.name, kinds[str(f.type)]) for f in fields(cls)})


@dataclass(frozen=True)
class Thresholds:
    """The limits the gate applies (recorded in the manifest with the verdict)."""

    max_ppl_ratio: float = 1.03          # int8 held-out perplexity / fp32's
    min_agreement: float = 0.90          # int8 vs fp32 greedy next-token agreement, teacher-forced
    # Token-by-token vs one-pass logits (max abs diff). fp32: float reordering only (measured 5e-5).
    # int8: onnxruntime's attention takes another GEMM kernel for one query row than for several;
    # the last-bit difference is blown up by MatMulNBits' int8 activation rounding downstream (on
    # SmolLM2 to 1.3, the same order as either one's distance to fp32, 1.5 and 2.1), so the int8
    # check also asks the argmax to agree. Graphs built --batch-invariant must match bit for bit.
    # fp16 (the GPU graph, --target cuda): fp16 rounding of activations and cache.
    kv_tolerance_fp32: float = 2e-3
    kv_tolerance_int8: float = 2.5
    kv_tolerance_fp16: float = 0.25
    min_kv_argmax_match: float = 0.9
    max_source_diff: float = 1e-2        # fp32 ONNX logits vs the PyTorch source (max abs)

    def kv_tolerance(self, precision: str) -> float:
        return {"fp32": self.kv_tolerance_fp32, "fp16": self.kv_tolerance_fp16}.get(precision, self.kv_tolerance_int8)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "validation.gate.thresholds") -> "Thresholds":
        return _simple(cls, data, where)


@dataclass(frozen=True)
class HeldOut:
    text: str
    tokens: int
    window: int

    @classmethod
    def from_dict(cls, data: Any, where: str = "validation.heldout") -> "HeldOut":
        return _simple(cls, data, where)


@dataclass(frozen=True)
class PerplexityScore:
    perplexity: float
    tokens: int

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "PerplexityScore":
        return _simple(cls, data, where)


@dataclass(frozen=True)
class ChatAgreement:
    """fp32's greedy chat replies teacher-forced through int8: how often int8 picks the same token."""

    prompts: int
    tokens: int
    agreement: float
    first_token_agreement: float

    @classmethod
    def from_dict(cls, data: Any, where: str = "validation.chat_agreement") -> "ChatAgreement":
        return _simple(cls, data, where)


@dataclass(frozen=True)
class DraftHead:
    tokens: int
    of: int
    counted_texts: int
    heldout_coverage: float
    speed: DecodeProbe

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "of": self.of, "counted_texts": self.counted_texts,
                "heldout_coverage": self.heldout_coverage, "speed": self.speed.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "validation.draft_head") -> "DraftHead":
        data = _obj(data, where)
        return cls(tokens=_get(data, where, "tokens", int), of=_get(data, where, "of", int),
                   counted_texts=_get(data, where, "counted_texts", int),
                   heldout_coverage=_get(data, where, "heldout_coverage", float),
                   speed=_probe(data.get("speed"), f"{where}.speed"))


@dataclass(frozen=True)
class KernelThresholds:
    """What the kernel twin (model.kernels.onnx) is held to against model.onnx, beside the int8 limits
    (perplexity ratio, agreement, KV consistency against fp32) it must also meet. 4.0: two graphs that each
    round activations to int8 in their own order; a flipped rounding in an early layer moves a few of ~1,000
    compared logits by 2-3 (SmolLM2-135M's twin: 2.31 max, 1.83 without CachedAttention and fp16 scales), the
    int8 graph's own noise against itself is up to 2.5 (Thresholds.kv_tolerance_int8); its quality is judged
    by the argmax match here and by perplexity and agreement against fp32."""

    max_abs_logit_diff: float = 4.0     # twin vs model.onnx, same tokens, teacher-forced
    min_argmax_match: float = 0.90      # positions where both graphs pick the same token

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "validation.kernel_graph.thresholds") -> "KernelThresholds":
        return _simple(cls, data, where)


# An int4 twin reads the source's own 4-bit blocks (GGUF Q4_1, a float minimum each), model.onnx onnxruntime's
# requantization of them (an integer zero point): two different 4-bit roundings of the weights, which differ as much
# as either does from fp32 (SmolLM2-135M, held-out window: model.onnx vs fp32 max 9.97, argmax 0.74; twin vs
# model.onnx 13.7, 0.76). So they are compared loosely, argmax at the int4 gate's agreement limit, and the twin's
# quality is judged against fp32 by the int4 gate's limits (Thresholds), as model.onnx's is.
INT4_KERNEL_THRESHOLDS = KernelThresholds(max_abs_logit_diff=20.0, min_argmax_match=0.70)


@dataclass(frozen=True)
class KernelCheck:
    """The kernel twin measured against the standard int8 graph (and fp32 inside `edgellm convert`), when
    edgellm's kernel library was there. kept: the twin passed (or the gate was not enforced) and is in the folder."""

    graph: str
    library: str
    isa: str | None
    positions: int                       # teacher-forced positions compared (held-out text + chat replies)
    max_abs_logit_diff: float            # twin vs model.onnx at those positions
    argmax_match: float
    kv_consistency: KVConsistency        # the twin's own one-pass vs token-by-token logits
    reference: str                       # what perplexity_ratio / greedy_agreement compare with: fp32 or int8
    perplexity_ratio: float
    greedy_agreement: float
    decode_ms_per_token: dict[str, float]  # model.onnx and the twin, measured alternately in one process
    passed: bool
    kept: bool
    failures: tuple[str, ...]
    thresholds: KernelThresholds

    def to_dict(self) -> dict:
        return {"graph": self.graph, "library": self.library, "isa": self.isa, "positions": self.positions,
                "max_abs_logit_diff": self.max_abs_logit_diff, "argmax_match": self.argmax_match,
                "kv_consistency": self.kv_consistency.to_dict(), "reference": self.reference,
                "perplexity_ratio": self.perplexity_ratio, "greedy_agreement": self.greedy_agreement,
                "decode_ms_per_token": dict(self.decode_ms_per_token), "passed": self.passed, "kept": self.kept,
                "failures": list(self.failures), "thresholds": self.thresholds.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str = "validation.kernel_graph") -> "KernelCheck":
        data = _obj(data, where)
        failures = data.get("failures")
        if not isinstance(failures, list) or not all(isinstance(f, str) for f in failures):
            raise _bad(f"{where}.failures", failures, "a list of strings")
        isa = data.get("isa")
        if isa is not None and not isinstance(isa, str):
            raise _bad(f"{where}.isa", isa, "a string or null")
        speed = _obj(data.get("decode_ms_per_token"), f"{where}.decode_ms_per_token")
        return cls(graph=_get(data, where, "graph", str), library=_get(data, where, "library", str), isa=isa,
                   positions=_get(data, where, "positions", int),
                   max_abs_logit_diff=_get(data, where, "max_abs_logit_diff", float),
                   argmax_match=_get(data, where, "argmax_match", float),
                   kv_consistency=_kv(data.get("kv_consistency"), f"{where}.kv_consistency"),
                   reference=_get(data, where, "reference", str),
                   perplexity_ratio=_get(data, where, "perplexity_ratio", float),
                   greedy_agreement=_get(data, where, "greedy_agreement", float),
                   decode_ms_per_token={k: _get(speed, f"{where}.decode_ms_per_token", k, float) for k in speed},
                   passed=_get(data, where, "passed", bool), kept=_get(data, where, "kept", bool),
                   failures=tuple(failures), thresholds=KernelThresholds.from_dict(data.get("thresholds")))


def kernel_failures(check: KernelCheck, thresholds: "Thresholds", precision: str = "int8") -> list[str]:
    """Why the kernel twin may not ship (empty: it may): its own limits against model.onnx, and the int8 graph's
    limits (perplexity ratio and greedy agreement against the reference, KV consistency)."""
    limits, failures = check.thresholds, []
    if check.max_abs_logit_diff > limits.max_abs_logit_diff:
        failures.append(f"kernel graph logits differ from model.onnx's by {check.max_abs_logit_diff:.4g} "
                        f"(limit {limits.max_abs_logit_diff})")
    if check.argmax_match < limits.min_argmax_match:
        failures.append(f"kernel graph and model.onnx pick the same token at {check.argmax_match:.3f} of positions "
                        f"(limit {limits.min_argmax_match})")
    if check.perplexity_ratio > thresholds.max_ppl_ratio:
        failures.append(f"kernel graph perplexity is {check.perplexity_ratio:.4f}x {check.reference}'s; the limit is "
                        f"{thresholds.max_ppl_ratio}x")
    if check.greedy_agreement < thresholds.min_agreement:
        failures.append(f"greedy agreement kernel graph vs {check.reference} is {check.greedy_agreement:.3f}; the "
                        f"limit is {thresholds.min_agreement}")
    kv, limit = check.kv_consistency, thresholds.kv_tolerance(precision)
    if kv.worst > limit:
        failures.append(f"kernel graph KV cache: stepwise vs one-pass logits differ by {kv.worst:.4g} (limit {limit})")
    if kv.argmax_match < thresholds.min_kv_argmax_match:
        failures.append(f"kernel graph KV cache: stepwise vs one-pass argmax agree on {kv.argmax_match:.3f} of "
                        f"positions (limit {thresholds.min_kv_argmax_match})")
    return failures


@dataclass(frozen=True)
class GateResult:
    passed: bool
    enforced: bool                       # False: written anyway (--no-gate)
    failures: tuple[str, ...]
    thresholds: Thresholds
    settings: dict                       # how much was measured: heldout_tokens, window, consistency_tokens

    def to_dict(self) -> dict:
        return {"passed": self.passed, "enforced": self.enforced, "failures": list(self.failures),
                "thresholds": self.thresholds.to_dict(), "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "validation.gate") -> "GateResult":
        data = _obj(data, where)
        failures = data.get("failures")
        if not isinstance(failures, list) or not all(isinstance(f, str) for f in failures):
            raise _bad(f"{where}.failures", failures, "a list of strings")
        return cls(passed=_get(data, where, "passed", bool), enforced=_get(data, where, "enforced", bool),
                   failures=tuple(failures), thresholds=Thresholds.from_dict(data.get("thresholds")),
                   settings=dict(_obj(data.get("settings"), f"{where}.settings")))


def _probe(data: Any, where: str) -> DecodeProbe:
    data = _obj(data, where)
    return DecodeProbe(prompt_tokens=_get(data, where, "prompt_tokens", int),
                       prefill_ms=_get(data, where, "prefill_ms", float),
                       decode_ms_per_token=_get(data, where, "decode_ms_per_token", float),
                       steps=_get(data, where, "steps", int))


def _kv(data: Any, where: str) -> KVConsistency:
    data = _obj(data, where)
    return KVConsistency(tokens=_get(data, where, "tokens", int),
                         max_abs_diff_stepwise=_get(data, where, "max_abs_diff_stepwise", float),
                         max_abs_diff_chunked=_get(data, where, "max_abs_diff_chunked", float),
                         argmax_match=_get(data, where, "argmax_match", float),
                         bit_identical=_get(data, where, "bit_identical", bool))


def _per_precision(data: Any, where: str, parse) -> dict:
    return {str(k): parse(v, f"{where}.{k}") for k, v in _obj(data, where).items()}


@dataclass(frozen=True)
class ValidationReport:
    """Everything `edgellm convert` measured on the model it wrote. Per-precision maps are keyed by precision:
    "fp32" (the reference export) and, unless the folder is fp32, the written graph's ("int8", "fp16")."""

    precision: str
    heldout: HeldOut
    tokenizer_identical_ids: bool
    batch_invariant: bool
    source_max_abs_diff: float
    scores: dict[str, PerplexityScore]
    kv_consistency: dict[str, KVConsistency]
    speed: dict[str, DecodeProbe]
    sizes_bytes: dict[str, float]
    perplexity_ratio: float | None = None
    greedy_agreement: float | None = None
    chat_agreement: ChatAgreement | None = None
    draft_head: DraftHead | None = None
    gate: GateResult | None = None
    kernel_graph: KernelCheck | None = None      # the kernel twin's own check (edgellm/convert/kernel_graph.py)
    target: str = "cpu"                          # the graph's device (convert --target)
    provider: str = "CPUExecutionProvider"       # where the gate ran it
    extra: dict = field(default_factory=dict)  # measurements a newer converter added; kept, not interpreted

    @property
    def candidate(self) -> str | None:
        """The graph judged against the fp32 reference (None: the folder is the fp32 reference itself)."""
        return None if self.precision == "fp32" else self.precision

    def to_dict(self) -> dict:
        data: dict = {"precision": self.precision, "target": self.target, "candidate": self.candidate,
                      "provider": self.provider, "heldout": vars(self.heldout),
                      "tokenizer_identical_ids": self.tokenizer_identical_ids, "batch_invariant": self.batch_invariant,
                      "source_max_abs_diff": self.source_max_abs_diff}
        data.update({name: vars(score) for name, score in self.scores.items()})
        data["kv_consistency"] = {name: kv.to_dict() for name, kv in self.kv_consistency.items()}
        data["speed"] = {name: probe.to_dict() for name, probe in self.speed.items()}
        data["sizes_bytes"] = dict(self.sizes_bytes)
        for name in ("perplexity_ratio", "greedy_agreement"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.chat_agreement is not None:
            data["chat_agreement"] = vars(self.chat_agreement)
        if self.draft_head is not None:
            data["draft_head"] = self.draft_head.to_dict()
        if self.gate is not None:
            data["gate"] = self.gate.to_dict()
        if self.kernel_graph is not None:
            data["kernel_graph"] = self.kernel_graph.to_dict()
        return {**self.extra, **data}

    @classmethod
    def from_dict(cls, data: Any, where: str = "validation") -> "ValidationReport":
        data = _obj(data, where)
        known = {"precision", "heldout", "tokenizer_identical_ids", "batch_invariant", "source_max_abs_diff",
                 "kv_consistency", "speed", "sizes_bytes", "perplexity_ratio", "greedy_agreement", "chat_agreement",
                 "draft_head", "gate", "target", "candidate", "provider", "kernel_graph"}
        kv = _per_precision(data.get("kv_consistency"), f"{where}.kv_consistency", _kv)
        optional = lambda name, kind: None if data.get(name) is None else _get(data, where, name, kind)  # noqa: E731
        return cls(
            precision=_get(data, where, "precision", str),
            heldout=HeldOut.from_dict(data.get("heldout"), f"{where}.heldout"),
            tokenizer_identical_ids=_get(data, where, "tokenizer_identical_ids", bool),
            batch_invariant=_get(data, where, "batch_invariant", bool),
            source_max_abs_diff=_get(data, where, "source_max_abs_diff", float),
            scores={name: PerplexityScore.from_dict(data[name], f"{where}.{name}") for name in kv if name in data},
            kv_consistency=kv,
            speed=_per_precision(data.get("speed"), f"{where}.speed", _probe),
            sizes_bytes={k: _get(data["sizes_bytes"], f"{where}.sizes_bytes", k, float)
                         for k in _obj(data.get("sizes_bytes"), f"{where}.sizes_bytes")},
            perplexity_ratio=optional("perplexity_ratio", float),
            greedy_agreement=optional("greedy_agreement", float),
            chat_agreement=None if data.get("chat_agreement") is None else ChatAgreement.from_dict(data["chat_agreement"]),
            draft_head=None if data.get("draft_head") is None else DraftHead.from_dict(data["draft_head"]),
            gate=None if data.get("gate") is None else GateResult.from_dict(data["gate"]),
            kernel_graph=None if data.get("kernel_graph") is None else KernelCheck.from_dict(data["kernel_graph"]),
            target=data.get("target", "cpu") if isinstance(data.get("target", "cpu"), str) else
            _get(data, where, "target", str),
            provider=data.get("provider", "CPUExecutionProvider") if isinstance(data.get("provider", ""), str) else
            _get(data, where, "provider", str),
            extra={k: v for k, v in data.items() if k not in known and k not in kv},
        )


def gate_failures(report: ValidationReport, thresholds: Thresholds) -> list[str]:
    """The reasons the model fails, each with its numbers and limit (empty list: it passes)."""
    failures = []
    if report.source_max_abs_diff > thresholds.max_source_diff:
        failures.append(f"fp32 ONNX logits differ from the PyTorch source by {report.source_max_abs_diff:.4g} "
                        f"(limit {thresholds.max_source_diff})")
    for precision, check in report.kv_consistency.items():
        limit = thresholds.kv_tolerance(precision)
        if check.worst > limit:
            failures.append(f"{precision} KV cache: stepwise vs one-pass logits differ by {check.worst:.4g} "
                            f"(limit {limit})")
        if report.batch_invariant and not check.bit_identical:
            failures.append(f"{precision} graph was built batch-invariant, yet stepwise and one-pass logits differ")
        if check.argmax_match < thresholds.min_kv_argmax_match:
            failures.append(f"{precision} KV cache: stepwise vs one-pass argmax agree on {check.argmax_match:.3f} "
                            f"of positions (limit {thresholds.min_kv_argmax_match})")
    if report.precision != "fp32":
        if report.perplexity_ratio is None or report.greedy_agreement is None:
            failures.append(f"the {report.precision} model was not compared with fp32 (no perplexity ratio)")
        else:
            if report.perplexity_ratio > thresholds.max_ppl_ratio:
                q, f = report.scores[report.precision].perplexity, report.scores["fp32"].perplexity
                failures.append(f"{report.precision} perplexity is {report.perplexity_ratio:.4f}x fp32 ({q:.3f} vs "
                                f"{f:.3f}); the limit is {thresholds.max_ppl_ratio}x")
            if report.greedy_agreement < thresholds.min_agreement:
                failures.append(f"greedy agreement {report.precision} vs fp32 is {report.greedy_agreement:.3f}; "
                                f"the limit is {thresholds.min_agreement}")
    return failures


__all__ = ["Thresholds", "HeldOut", "PerplexityScore", "ChatAgreement", "DraftHead", "GateResult",
           "KernelThresholds", "KernelCheck", "kernel_failures", "ValidationReport", "gate_failures"]
