"""The contract between `edgellm convert` and the runtime: what the decoder graph looks like, typed.

convert builds these three values and writes them into the manifest (`dims`, `io`, `graph`); the
runtime reads them back with `from_dict`, which names the field that is missing or of the wrong
type, and `check_session` holds them against the onnxruntime session's own inputs and outputs, so
a manifest that disagrees with its graph fails at load, not at the first generate.

Torch-free and onnx-free: both sides import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from .errors import ModelFormatError

_FIX = "Fix: re-run `edgellm convert` to write a fresh model folder."


def _field_error(where: str, name: str, value: Any, expected: str) -> ModelFormatError:
    if value is _MISSING:
        return ModelFormatError(f"manifest field {where}.{name} is missing; it must be {expected}. {_FIX}")
    return ModelFormatError(f"manifest field {where}.{name}={value!r} is invalid: it must be {expected}. {_FIX}")


_MISSING = object()


def _mapping(data: Any, where: str) -> Mapping:
    if not isinstance(data, Mapping):
        raise ModelFormatError(f"manifest field {where}={data!r} is invalid: it must be a JSON object. {_FIX}")
    return data


def _positive_int(data: Mapping, where: str, name: str) -> int:
    value = data.get(name, _MISSING)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _field_error(where, name, value, "an integer >= 1")
    return value


def _name(data: Mapping, where: str, name: str) -> str:
    value = data.get(name, _MISSING)
    if not isinstance(value, str) or not value:
        raise _field_error(where, name, value, "a non-empty string (a graph input or output name)")
    return value


def _names(data: Mapping, where: str, name: str, count: int) -> tuple[str, ...]:
    value = data.get(name, _MISSING)
    if not isinstance(value, (list, tuple)) or len(value) != count \
            or not all(isinstance(v, str) and v for v in value):
        raise _field_error(where, name, value, f"a list of {count} names, one per layer")
    return tuple(value)


@dataclass(frozen=True)
class ModelDims:
    """Dimensions of a Llama-style decoder; stored in the manifest so the runtime needs no config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int

    def __post_init__(self) -> None:
        self.from_dict(self.to_dict(), where="dims")  # the same checks whether built in code or read from JSON

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "dims") -> "ModelDims":
        data = _mapping(data, where)
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "rms_norm_eps":
                eps = data.get(f.name, _MISSING)
                if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (math.isfinite(eps) and eps > 0):
                    raise _field_error(where, f.name, eps, "a finite number > 0")
                values[f.name] = float(eps)
            else:
                values[f.name] = _positive_int(data, where, f.name)
        if values["num_heads"] % values["num_kv_heads"]:
            raise _field_error(where, "num_kv_heads", values["num_kv_heads"],
                               f"a divisor of num_heads={values['num_heads']}")
        dims = object.__new__(cls)  # checked above: skip __post_init__'s second pass
        for name, value in values.items():
            object.__setattr__(dims, name, value)
        return dims


@dataclass(frozen=True)
class IONames:
    """The graph's input and output names, KV lists in layer order; the runtime reads, never guesses, them."""

    past_key: tuple[str, ...]
    past_value: tuple[str, ...]
    present_key: tuple[str, ...]
    present_value: tuple[str, ...]
    input_ids: str = "input_ids"
    attention_mask: str = "attention_mask"
    num_logits_to_keep: str = "num_logits_to_keep"
    logits: str = "logits"

    @classmethod
    def for_layers(cls, num_layers: int) -> "IONames":
        """The names `edgellm.convert.graph.build_decoder` gives its inputs and outputs."""
        return cls(past_key=tuple(f"past_key_values.{i}.key" for i in range(num_layers)),
                   past_value=tuple(f"past_key_values.{i}.value" for i in range(num_layers)),
                   present_key=tuple(f"present.{i}.key" for i in range(num_layers)),
                   present_value=tuple(f"present.{i}.value" for i in range(num_layers)))

    @property
    def num_layers(self) -> int:
        return len(self.past_key)

    @property
    def kv_pairs(self) -> list[tuple[str, str]]:
        """(past input, present output) per cache buffer: all keys, then all values."""
        return list(zip(self.past_key + self.past_value, self.present_key + self.present_value))

    @property
    def inputs(self) -> tuple[str, ...]:
        return (self.input_ids, self.attention_mask, self.num_logits_to_keep) + self.past_key + self.past_value

    @property
    def outputs(self) -> tuple[str, ...]:
        return (self.logits,) + self.present_key + self.present_value

    def to_dict(self) -> dict:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "num_logits_to_keep": self.num_logits_to_keep, "logits": self.logits,
                "past_key": list(self.past_key), "past_value": list(self.past_value),
                "present_key": list(self.present_key), "present_value": list(self.present_value)}

    @classmethod
    def from_dict(cls, data: Any, num_layers: int, where: str = "io") -> "IONames":
        data = _mapping(data, where)
        singles = {n: _name(data, where, n) for n in ("input_ids", "attention_mask", "num_logits_to_keep", "logits")}
        lists = {n: _names(data, where, n, num_layers) for n in ("past_key", "past_value", "present_key", "present_value")}
        return cls(**lists, **singles)


KV_DTYPES = ("float32", "float16")
TARGET_KV_DTYPES = {"cpu": "float32", "cuda": "float16"}  # CUDA's GroupQueryAttention has fp16/bf16 kernels only


@dataclass(frozen=True)
class GraphOptions:
    """Build choices the runtime must honour.

    attention_pad_rows: cache slots past the logical capacity that attention writes (batch-invariant
        graphs pad every attention call with one row at position T, so their KV buffers need one more slot).
    head_tokens: file (.npy) of the token ids a restricted draft lm_head covers, or None for the full vocabulary.
    target: the hardware the graph was built for: "cpu", or "cuda" (onnxruntime's CUDA/TensorRT providers).
    kv_dtype: what the KV cache holds, so the runtime allocates its buffers in it: "float32" (cpu), "float16" (cuda).
    """

    batch_invariant: bool = False
    attention_pad_rows: int = 0
    head_tokens: str | None = None
    target: str = "cpu"
    kv_dtype: str = "float32"

    @classmethod
    def for_build(cls, batch_invariant: bool, head_tokens: str | None = None, target: str = "cpu") -> "GraphOptions":
        return cls(batch_invariant=batch_invariant, attention_pad_rows=1 if batch_invariant else 0,
                   head_tokens=head_tokens, target=target, kv_dtype=TARGET_KV_DTYPES[target])

    def to_dict(self) -> dict:
        data: dict = {"target": self.target, "kv_dtype": self.kv_dtype, "batch_invariant": self.batch_invariant,
                      "attention_pad_rows": self.attention_pad_rows}
        if self.head_tokens is not None:
            data["head_tokens"] = self.head_tokens
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "graph") -> "GraphOptions":
        data = _mapping(data, where)
        invariant = data.get("batch_invariant", False)
        if not isinstance(invariant, bool):
            raise _field_error(where, "batch_invariant", invariant, "true or false")
        # Folders written before the field existed: batch-invariant graphs had exactly one pad row.
        pad = data.get("attention_pad_rows", 1 if invariant else 0)
        if isinstance(pad, bool) or not isinstance(pad, int) or not 0 <= pad <= 8:
            raise _field_error(where, "attention_pad_rows", pad, "an integer in 0..8")
        head = data.get("head_tokens")
        if head is not None and (not isinstance(head, str) or not head):
            raise _field_error(where, "head_tokens", head, "a file name in the model folder, or absent")
        target = data.get("target", "cpu")  # folders written before the field existed were CPU graphs
        if target not in TARGET_KV_DTYPES:
            raise _field_error(where, "target", target, f"one of {', '.join(TARGET_KV_DTYPES)}")
        kv_dtype = data.get("kv_dtype", "float32")
        if kv_dtype not in KV_DTYPES:
            raise _field_error(where, "kv_dtype", kv_dtype, f"one of {', '.join(KV_DTYPES)}")
        return cls(batch_invariant=invariant, attention_pad_rows=pad, head_tokens=head, target=target,
                   kv_dtype=kv_dtype)


def check_session(inputs: Sequence[Any], outputs: Sequence[Any], io: IONames, dims: ModelDims,
                  head_size: int | None = None, model: str = "the model") -> None:
    """Hold the manifest's names and dimensions against the graph's (onnxruntime NodeArg lists: .name, .shape).

    KV inputs/outputs are (batch, num_kv_heads, cache_length, head_dim); logits (batch, kept, head_size), where
    head_size is the vocabulary unless a draft head covers fewer tokens. Symbolic dimensions are not checked.
    Raises ModelFormatError naming every disagreement.
    """
    shapes = {arg.name: list(arg.shape) for arg in list(inputs) + list(outputs)}
    problems = []
    have_in, have_out = {a.name for a in inputs}, {a.name for a in outputs}
    missing_in = [n for n in io.inputs if n not in have_in]
    missing_out = [n for n in io.outputs if n not in have_out]
    if missing_in:
        problems.append(f"inputs {', '.join(missing_in[:4])}{' …' if len(missing_in) > 4 else ''} named in io are "
                        f"not inputs of the graph (it has {len(have_in)}: {', '.join(sorted(have_in)[:4])} …)")
    if missing_out:
        problems.append(f"outputs {', '.join(missing_out[:4])}{' …' if len(missing_out) > 4 else ''} named in io are "
                        "not outputs of the graph")
    extra = sorted(have_in - set(io.inputs))
    if extra:
        problems.append(f"the graph has inputs the manifest does not name: {', '.join(extra[:4])} "
                        f"(a graph with {len(have_in) - 3} KV inputs, manifest io for {io.num_layers} layers?)")

    def agree(name: str, axis: int, expected: int, label: str) -> None:
        shape = shapes.get(name)
        if shape is None or len(shape) <= axis:
            return
        actual = shape[axis]
        if isinstance(actual, int) and actual != expected:
            problems.append(f"dims.{label}={expected} but the graph's {name} has {actual} on that axis")

    for name in io.past_key + io.past_value + io.present_key + io.present_value:
        if name in shapes and len(shapes[name]) != 4:
            problems.append(f"{name} has rank {len(shapes[name])}, not 4 (batch, kv_heads, cache, head_dim)")
    if io.past_key:
        agree(io.past_key[0], 1, dims.num_kv_heads, "num_kv_heads")
        agree(io.past_key[0], 3, dims.head_dim, "head_dim")
    agree(io.logits, 2, head_size if head_size is not None else dims.vocab_size,
          "vocab_size" if head_size is None else "head size (graph.head_tokens)")
    if problems:
        # one line, each disagreement once
        seen = list(dict.fromkeys(problems))
        raise ModelFormatError(f"{model}'s manifest does not match its graph: " + "; ".join(seen) + f". {_FIX}")
