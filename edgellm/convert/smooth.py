"""SmoothQuant-style scaling before int8: move activation outliers into the weights.

accuracy_level 4 quantizes each MatMul's *activations* to int8 per block, and a few channels of
a Llama's activations are 10-100x larger than the rest, so they set the block scale and crush
their neighbours. For each MatMul input channel j we divide the activation by
s_j = max|X_j|^alpha / max|W_j|^(1-alpha) and multiply the weight row by s_j. The division is
folded into whatever produces the activation (RMSNorm gains, up_proj rows, v_proj rows), so the
fp32 model computes exactly the same function; only where the rounding error lands changes.
(Xiao et al., 2023, "SmoothQuant".) Measured on SmolLM2-135M: see README.

Works on numpy state dicts with Hugging Face Llama names; calibration runs the torch source.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .graph import DecoderDims

DEFAULT_ALPHA = 0.5
CALIBRATION_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration_en.txt"
CALIBRATION_CHATS = [
    "What is the capital of Spain?", "Tell me a joke.", "How do I boil an egg?", "Turn on the kitchen lights.",
    "Who wrote Hamlet?", "Explain photosynthesis briefly.", "Set a timer for five minutes.",
    "What's the weather like on Mars?",
]
_SCALE_RANGE = (1e-2, 1e2)


def activation_maxima(model, tokenizer, max_tokens: int = 1024) -> dict[str, np.ndarray]:
    """Per-channel max |input| of every linear layer, over calibration prose and chat prompts."""
    import torch

    stats: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_module, inputs):
            x = inputs[0].detach().abs().reshape(-1, inputs[0].shape[-1]).amax(0)
            stats[name] = torch.maximum(stats[name], x) if name in stats else x
        return hook

    handles = []
    for i, layer in enumerate(model.model.layers):
        handles += [
            layer.self_attn.q_proj.register_forward_pre_hook(record(f"{i}.qkv")),
            layer.self_attn.o_proj.register_forward_pre_hook(record(f"{i}.o")),
            layer.mlp.gate_proj.register_forward_pre_hook(record(f"{i}.gate_up")),
            layer.mlp.down_proj.register_forward_pre_hook(record(f"{i}.down")),
        ]
    texts = [CALIBRATION_TEXT.read_text()]
    if getattr(tokenizer, "chat_template", None):
        texts += [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                                add_generation_prompt=True) for q in CALIBRATION_CHATS]
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :max_tokens]
                model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return {k: v.float().numpy() for k, v in stats.items()}


def _scales(activation_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    weight_max = np.max([np.abs(w).max(axis=0) for w in weights], axis=0)  # (out, in) -> per input channel
    s = np.power(np.maximum(activation_max, 1e-5), alpha) / np.power(np.maximum(weight_max, 1e-5), 1 - alpha)
    return np.clip(s, *_SCALE_RANGE).astype(np.float32)


def smooth_state_dict(state: dict[str, np.ndarray], maxima: dict[str, np.ndarray], dims: DecoderDims,
                      alpha: float = DEFAULT_ALPHA) -> None:
    """Rescale `state` in place; the function the model computes in fp32 is unchanged."""
    group = dims.num_heads // dims.num_kv_heads
    for i in range(dims.num_layers):
        p = f"model.layers.{i}"
        attn, mlp = f"{p}.self_attn", f"{p}.mlp"
        qkv = [state[f"{attn}.{n}_proj.weight"] for n in "qkv"]
        s = _scales(maxima[f"{i}.qkv"], qkv, alpha)
        state[f"{p}.input_layernorm.weight"] = state[f"{p}.input_layernorm.weight"] / s
        for n in "qkv":
            state[f"{attn}.{n}_proj.weight"] = state[f"{attn}.{n}_proj.weight"] * s[None, :]

        s = _scales(maxima[f"{i}.gate_up"], [state[f"{mlp}.gate_proj.weight"], state[f"{mlp}.up_proj.weight"]], alpha)
        state[f"{p}.post_attention_layernorm.weight"] = state[f"{p}.post_attention_layernorm.weight"] / s
        for n in ("gate", "up"):
            state[f"{mlp}.{n}_proj.weight"] = state[f"{mlp}.{n}_proj.weight"] * s[None, :]

        # down_proj's input is silu(gate) * up: linear in up's output rows.
        s = _scales(maxima[f"{i}.down"], [state[f"{mlp}.down_proj.weight"]], alpha)
        state[f"{mlp}.up_proj.weight"] = state[f"{mlp}.up_proj.weight"] / s[:, None]
        state[f"{mlp}.down_proj.weight"] = state[f"{mlp}.down_proj.weight"] * s[None, :]

        # o_proj's input is attention-weighted V: linear in v_proj's output rows, which each
        # kv head shares with `group` query heads, so the scale is shared across that group.
        s = _scales(maxima[f"{i}.o"], [state[f"{attn}.o_proj.weight"]], alpha)
        s_kv = s.reshape(dims.num_kv_heads, group, dims.head_dim).max(axis=1)
        s_q = np.repeat(s_kv[:, None, :], group, axis=1).reshape(-1)
        state[f"{attn}.v_proj.weight"] = state[f"{attn}.v_proj.weight"] / s_kv.reshape(-1)[:, None]
        state[f"{attn}.o_proj.weight"] = state[f"{attn}.o_proj.weight"] * s_q[None, :]
