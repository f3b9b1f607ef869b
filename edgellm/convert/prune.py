"""Student initialization by structured pruning of a Llama teacher: fewer layers, optionally a narrower MLP.

Layer choice:
    uniform          every k-th layer, first and last always kept
    block_influence  drop layers whose output is most like their input (1 - cos, ShortGPT), one pass
    loss             drop layers whose removal alone raises KL(teacher || pruned) least, one pass per layer
MLP neurons are ranked by mean |silu(gate) * up| on calibration text (Minitron-style activation importance).
Weights are copied key by key with a shape check on every tensor, like nanoGPT's from_pretrained.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidParameterError, ModelFormatError

logger = logging.getLogger(__name__)

LAYER_METHODS = ("uniform", "block_influence", "loss")
# Keys a saved config must not inherit from the teacher (GGUF loading, hub bookkeeping).
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                     "transformers_version", "id2label", "label2id")


@dataclass(frozen=True)
class PrunePlan:
    """Which teacher layers the student keeps, and per kept layer which MLP neurons (None: all)."""

    layers: tuple[int, ...]
    intermediate_size: int
    neurons: tuple[tuple[int, ...], ...] | None = None  # per student layer, sorted teacher neuron ids

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "intermediate_size": self.intermediate_size,
                "neurons": [list(n) for n in self.neurons] if self.neurons is not None else None}

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        neurons = data.get("neurons")
        return cls(tuple(data["layers"]), int(data["intermediate_size"]),
                   tuple(tuple(n) for n in neurons) if neurons is not None else None)


class ShapeMismatchError(ModelFormatError):
    """A weight copied from teacher to student does not have the shape the student expects."""


def uniform_layers(num_layers: int, keep: int) -> tuple[int, ...]:
    """keep evenly spaced layers, always the first and the last."""
    if not 1 <= keep <= num_layers:
        raise InvalidParameterError(f"cannot keep {keep} of {num_layers} layers; pick 1..{num_layers}")
    if keep == 1:
        return (num_layers - 1,)
    return tuple(sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)}))


@contextmanager
def _only_layers(model: nn.Module, keep: list[int]):
    """Temporarily run a Llama model with a subset of its decoder layers."""
    full = model.model.layers
    model.model.layers = nn.ModuleList([full[i] for i in keep])
    try:
        yield model
    finally:
        model.model.layers = full


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student); logits (B, T, V)."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def layer_scores(teacher: nn.Module, batches: list[torch.Tensor], method: str) -> list[float]:
    """Importance of each layer (higher = keep). batches: token ids (B, T) on the teacher's device."""
    n = teacher.config.num_hidden_layers
    if method == "block_influence":
        scores = [0.0] * n

        def hook(module, args, output, i):
            out = output[0] if isinstance(output, tuple) else output
            scores[i] += (1 - F.cosine_similarity(args[0], out, dim=-1)).mean().item() / len(batches)

        hooks = [layer.register_forward_hook(lambda m, a, o, i=i: hook(m, a, o, i))
                 for i, layer in enumerate(teacher.model.layers)]
        _run_hooked(teacher, hooks, batches)
        return scores
    if method == "loss":
        reference = [teacher(ids, use_cache=False).logits for ids in batches]
        scores = []
        for drop in range(n):
            with _only_layers(teacher, [i for i in range(n) if i != drop]):
                kl = sum(_kl(ref, teacher(ids, use_cache=False).logits).item() for ids, ref in zip(batches, reference))
            scores.append(kl / len(batches))
            logger.debug("layer %d dropped alone: KL %.4f", drop, scores[-1])
        return scores
    raise InvalidParameterError(f"unknown layer method {method!r}; pick one of {', '.join(LAYER_METHODS)}")


def _run_hooked(teacher: nn.Module, hooks: list, batches: list[torch.Tensor]) -> None:
    """Run the batches through the teacher for its hooks' side effects, then remove the hooks."""
    try:
        for ids in batches:
            teacher(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()


def select_layers(scores: list[float], keep: int, always: tuple[int, ...] = ()) -> tuple[int, ...]:
    """The keep highest-scoring layers (plus `always`), in model order."""
    n = len(scores)
    if not 1 <= keep <= n:
        raise InvalidParameterError(f"cannot keep {keep} of {n} layers; pick 1..{n}")
    chosen = {i % n for i in always}
    for i in sorted(range(n), key=lambda i: -scores[i]):
        if len(chosen) >= keep:
            break
        chosen.add(i)
    return tuple(sorted(chosen))


@torch.no_grad()
def neuron_scores(teacher: nn.Module, batches: list[torch.Tensor], layers: tuple[int, ...]) -> list[torch.Tensor]:
    """Mean |silu(gate(x)) * up(x)| per MLP neuron for each listed layer: (intermediate,) each."""
    sums = {i: torch.zeros(teacher.config.intermediate_size) for i in layers}
    hooks = []
    for i in layers:
        def hook(module, args, i=i):
            sums[i] += args[0].abs().float().mean(dim=(0, 1)).cpu()  # down_proj's input: (B, T, I)

        hooks.append(teacher.model.layers[i].mlp.down_proj.register_forward_pre_hook(hook))
    _run_hooked(teacher, hooks, batches)
    return [sums[i] / len(batches) for i in layers]


def student_config(teacher_config, num_layers: int, intermediate_size: int):
    """The teacher's config with fewer layers / a narrower MLP, without GGUF or hub leftovers."""
    from transformers import LlamaConfig

    data = {k: v for k, v in teacher_config.to_dict().items() if k not in _DROP_CONFIG_KEYS}
    data.update(num_hidden_layers=num_layers, intermediate_size=intermediate_size,
                architectures=["LlamaForCausalLM"], dtype="float32")
    if "layer_types" in data and data["layer_types"] is not None:
        data["layer_types"] = [data["layer_types"][0]] * num_layers
    return LlamaConfig(**data)


def student_state_dict(teacher_state: dict[str, torch.Tensor], plan: PrunePlan) -> dict[str, torch.Tensor]:
    """Map teacher weights to student names: layer j <- teacher layer plan.layers[j]; MLP rows/cols sliced."""
    out = {}
    for key, tensor in teacher_state.items():
        if not key.startswith("model.layers."):
            out[key] = tensor
            continue
        index, rest = key[len("model.layers."):].split(".", 1)
        if int(index) not in plan.layers:
            continue
        j = plan.layers.index(int(index))
        if plan.neurons is not None:
            keep = torch.tensor(plan.neurons[j], dtype=torch.long)
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                tensor = tensor.index_select(0, keep)  # (I, H) -> (I', H)
            elif rest == "mlp.down_proj.weight":
                tensor = tensor.index_select(1, keep)  # (H, I) -> (H, I')
        out[f"model.layers.{j}.{rest}"] = tensor
    return out


@torch.no_grad()
def copy_weights(student: nn.Module, source: dict[str, torch.Tensor]) -> None:
    """Copy every student parameter/buffer from source by name, checking each shape. Raises once with all problems."""
    target = student.state_dict()
    missing = [k for k in target if k not in source]
    wrong = [f"{k}: student {tuple(v.shape)} vs source {tuple(source[k].shape)}"
             for k, v in target.items() if k in source and source[k].shape != v.shape]
    if missing or wrong:
        more = " ..." if len(missing) > 8 else ""
        lines = [f"missing in source: {', '.join(missing[:8])}{more}"] if missing else []
        lines += wrong[:8] + (["..."] if len(wrong) > 8 else [])
        raise ShapeMismatchError("cannot initialize the student from the teacher: " + "; ".join(lines)
                                 + ". Fix: build the student config from the same teacher (student_config).")
    for k, v in target.items():
        v.copy_(source[k])


def init_student(teacher: nn.Module, plan: PrunePlan) -> nn.Module:
    """A new LlamaForCausalLM holding the teacher's kept weights (float32, on the CPU)."""
    from transformers import LlamaForCausalLM

    config = student_config(teacher.config, len(plan.layers), plan.intermediate_size)
    student = LlamaForCausalLM(config)
    state = {k: v.detach().float().cpu() for k, v in teacher.state_dict().items()}
    copy_weights(student, student_state_dict(state, plan))
    if config.tie_word_embeddings:
        student.tie_weights()
    return student


def make_plan(teacher: nn.Module, batches: list[torch.Tensor], keep_layers: int | tuple[int, ...] | None,
              method: str = "loss", intermediate_size: int | None = None) -> PrunePlan:
    """Decide the student's layers (a count chosen by `method`, explicit ids, or None: all) and MLP neurons."""
    n = teacher.config.num_hidden_layers
    if keep_layers is None:
        layers = tuple(range(n))
    elif isinstance(keep_layers, int):
        if method == "uniform":
            layers = uniform_layers(n, keep_layers)
        else:
            # First and last layers stay: embedding read-in and logit read-out (dropping them hurts most).
            layers = select_layers(layer_scores(teacher, batches, method), keep_layers, always=(0, n - 1))
    else:
        layers = tuple(sorted(set(keep_layers)))
        if not layers or layers[0] < 0 or layers[-1] >= n:
            raise InvalidParameterError(f"layer ids {list(keep_layers)} out of range 0..{n - 1}")
    full = teacher.config.intermediate_size
    width = full if intermediate_size is None else intermediate_size
    if not 1 <= width <= full:
        raise InvalidParameterError(f"intermediate size {width} must be in 1..{full} (the teacher's)")
    neurons = None
    if width < full:
        scores = neuron_scores(teacher, batches, layers)
        neurons = tuple(tuple(sorted(s.topk(width).indices.tolist())) for s in scores)
    return PrunePlan(layers=layers, intermediate_size=width, neurons=neurons)
