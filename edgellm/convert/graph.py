"""Build a Llama-family decoder as an ONNX graph with a KV cache, straight from its weights.

Why by hand and not through torch.onnx.export / optimum: a traced export gives ~15 small
ops per attention block, which costs more per token on a 2-core CPU than the matrix work
itself. Here each layer is a handful of onnxruntime's fused kernels —
SkipSimplifiedLayerNormalization, one packed QKV MatMul, GroupQueryAttention with rotary
inside and an in-place KV buffer — so the graph quantizes to MatMulNBits cleanly and decodes
at the memory-bandwidth pace. The same graph serves prefill (S > 1) and decode (S = 1).

Batch-invariant graphs (`batch_invariant=True`, `edgellm convert --batch-invariant`) give every
attention call one padding row (a copy of the last query/key/value) that is sliced off again.
Why: onnxruntime's CPU attention takes a different GEMM kernel for a single query row than for
several, so a one-token decode step and a multi-token pass (speculative verification, prefill,
a prefix-cache hit) disagree in the last float bits, and int8 activation rounding downstream
blows that up to ~0.5-1 logit. With the pad, attention always sees at least two rows and a
position's logits are bit-identical however the tokens were batched. The price is one extra
attention row (decode +3% at short context, +7% at 256-512 tokens, +20% at 1,024 on 2 threads:
scripts/bench_attention_pad.py) and one cache slot, so it is a choice, not the default.

I/O (batch B, new tokens S, logical length T = past + S, cache buffer length L >= T):
    input_ids               int64   (B, S)
    attention_mask          int64   (B, T)     ones; its length is the logical length
    num_logits_to_keep      int64   ()         logits only for the last n positions
    past_key_values.{i}.key float   (B, kvH, L, hd)  shared in place with present.{i}.key; L >= T + 1
    logits                  float32 (B, n, V)
    present.{i}.key/value   float   (B, kvH, L, hd)
"float" is float32 for the CPU graph and float16 for the GPU graph (activation_dtype, manifest "kv_dtype").
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..contract import GraphOptions, IONames, ModelDims
from ..errors import ModelFormatError

OPSET = 21
INT64_MAX = np.iinfo(np.int64).max
# Activation/KV dtypes a graph can be built in. Logits leave the graph as fp32 either way: the cast is one
# small kernel on the device, the host copy is 4 bytes x vocab per step, and sampling, log-softmax and the
# validation gate stay one fp32 code path for every target.
FLOAT_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}


DecoderDims = ModelDims  # the contract's type (edgellm.contract), under the name convert has always used


def io_names(num_layers: int) -> IONames:
    """The graph's input/output names; the manifest records them so the runtime reads, not guesses."""
    return IONames.for_layers(num_layers)


def attention_pad_rows(batch_invariant: bool) -> int:
    """Padding rows per attention call (see the module docstring); the manifest records it (graph options)."""
    return GraphOptions.for_build(batch_invariant).attention_pad_rows


class _GraphWriter:
    """Collects nodes and initializers; names values by the node that makes them."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const_i64(self, name: str, values: list[int]) -> str:
        return self.weight(name, np.array(values, dtype=np.int64))

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", **attrs) -> list[str]:
        outputs = [f"{name}/out{k}" for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def rotary_caches(inv_freq: np.ndarray, max_positions: int, scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin tables (max_positions, head_dim/2) as GroupQueryAttention's do_rotary expects."""
    positions = np.arange(max_positions, dtype=np.float64)
    freqs = np.outer(positions, inv_freq.astype(np.float64))
    return (np.cos(freqs) * scaling).astype(np.float32), (np.sin(freqs) * scaling).astype(np.float32)


def build_decoder(dims: DecoderDims, weights: dict[str, np.ndarray], inv_freq: np.ndarray,
                  rope_scaling: float = 1.0, batch_invariant: bool = False,
                  activation_dtype: str = "float32") -> onnx.ModelProto:
    """weights: Hugging Face Llama names (model.layers.{i}.self_attn.q_proj.weight, ...) as float32.

    Linear weights arrive as (out, in) like torch; MatMul wants (in, out), so they are transposed here.
    activation_dtype "float16" builds the GPU graph (edgellm convert --target cuda): weights, activations,
    rotary tables and the KV cache in fp16, because onnxruntime's CUDA GroupQueryAttention has fp16/bf16
    kernels only; the logits are cast to fp32 on the device (see FLOAT_TYPES).
    """
    if activation_dtype not in FLOAT_TYPES:
        raise ValueError(f"activation_dtype={activation_dtype!r} is not one of {', '.join(FLOAT_TYPES)}")
    dtype, onnx_type = np.dtype(activation_dtype), FLOAT_TYPES[activation_dtype]
    g = _GraphWriter()
    pad_rows = attention_pad_rows(batch_invariant)
    n_layers, hd = dims.num_layers, dims.head_dim
    kv_shape = ["batch", dims.num_kv_heads, "cache_length", hd]
    io = io_names(n_layers)

    def w(key: str) -> np.ndarray:
        if key not in weights:
            raise ModelFormatError(f"weight {key} is missing from the source model ({len(weights)} tensors, none of "
                                   "that name), so it is not a complete Llama checkpoint. Fix: convert the full "
                                   "model folder or GGUF file (not a partial or adapter-only checkpoint).")
        return weights[key].astype(dtype, copy=False)

    # Attention bookkeeping shared by every layer: GQA takes lengths, not a mask.
    mask_sum = g.node("ReduceSum", [io.attention_mask, g.const_i64("axes_1", [1])], "mask/sum", keepdims=0)[0]
    seqlens = g.node("Sub", [mask_sum, g.const_i64("one_i64", [1])], "mask/sub")[0]
    seqlens_k = g.node("Cast", [seqlens], "mask/seqlens_k", to=TensorProto.INT32)[0]
    mask_shape = g.node("Shape", [io.attention_mask], "mask/shape")[0]
    total = g.node("Gather", [mask_shape, g.weight("idx_1", np.array(1, dtype=np.int64))], "mask/total", axis=0)[0]
    total_seq_len = g.node("Cast", [total], "mask/total_seq_len", to=TensorProto.INT32)[0]
    if pad_rows:  # the padding row sits at position T: attention sees one more token than the caller sent
        pad_i32 = g.weight("pad_rows_i32", np.array(pad_rows, dtype=np.int32))
        seqlens_k = g.node("Add", [seqlens_k, pad_i32], "mask/seqlens_k_padded")[0]
        total_seq_len = g.node("Add", [total_seq_len, pad_i32], "mask/total_seq_len_padded")[0]
        pad_last_row = g.const_i64("pad/pads", [0, 0, 0, 0, pad_rows, 0])  # (B, S, D): S grows at its end
        real_rows = [g.const_i64("unpad/start", [0]), g.const_i64("unpad/end", [-pad_rows]),
                     g.const_i64("unpad/axes", [1])]
    cos, sin = rotary_caches(inv_freq, dims.max_positions + pad_rows, rope_scaling)
    cos_cache, sin_cache = g.weight("cos_cache", cos.astype(dtype)), g.weight("sin_cache", sin.astype(dtype))

    embed = g.weight("model.embed_tokens.weight", w("model.embed_tokens.weight"))
    hidden = g.node("Gather", [embed, io.input_ids], "embed")[0]
    normed = g.node("SimplifiedLayerNormalization",
                    [hidden, g.weight("layers.0.input_norm", w("model.layers.0.input_layernorm.weight"))],
                    "layers.0/input_norm", axis=-1, epsilon=dims.rms_norm_eps, stash_type=1)[0]
    residual = hidden

    for i in range(n_layers):
        p = f"model.layers.{i}"
        qkv = np.concatenate([w(f"{p}.self_attn.q_proj.weight"), w(f"{p}.self_attn.k_proj.weight"),
                              w(f"{p}.self_attn.v_proj.weight")], axis=0).T
        qkv_out = g.node("MatMul", [normed, g.weight(f"layers.{i}.qkv_proj", qkv)], f"layers.{i}/qkv_proj")[0]
        if pad_rows:
            qkv_out = g.node("Pad", [qkv_out, pad_last_row], f"layers.{i}/qkv_padded", mode="edge")[0]
        attn = g.node(
            "GroupQueryAttention",
            [qkv_out, "", "", io.past_key[i], io.past_value[i],
             seqlens_k, total_seq_len, cos_cache, sin_cache],
            f"layers.{i}/attn", n_out=1, domain="com.microsoft",
            num_heads=dims.num_heads, kv_num_heads=dims.num_kv_heads, scale=float(hd ** -0.5),
            do_rotary=1, rotary_interleaved=0, local_window_size=-1,
        )[0]
        g.nodes[-1].output.extend([io.present_key[i], io.present_value[i]])
        if pad_rows:
            attn = g.node("Slice", [attn, *real_rows], f"layers.{i}/attn_unpad")[0]
        attn_out = g.node("MatMul", [attn, g.weight(f"layers.{i}.o_proj", w(f"{p}.self_attn.o_proj.weight").T)],
                          f"layers.{i}/o_proj")[0]
        post_norm = g.weight(f"layers.{i}.post_attention_norm", w(f"{p}.post_attention_layernorm.weight"))
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [attn_out, residual, post_norm],
                                        f"layers.{i}/post_attention_norm", n_out=4, domain="com.microsoft",
                                        epsilon=dims.rms_norm_eps)

        gate_up = np.concatenate([w(f"{p}.mlp.gate_proj.weight"), w(f"{p}.mlp.up_proj.weight")], axis=0).T
        gu = g.node("MatMul", [normed, g.weight(f"layers.{i}.gate_up_proj", gate_up)], f"layers.{i}/gate_up_proj")[0]
        gate, up = g.node("Split", [gu, g.const_i64(f"layers.{i}.split", [dims.intermediate_size] * 2)],
                          f"layers.{i}/split", n_out=2, axis=-1)
        sig = g.node("Sigmoid", [gate], f"layers.{i}/sigmoid")[0]
        silu = g.node("Mul", [gate, sig], f"layers.{i}/silu")[0]
        act = g.node("Mul", [silu, up], f"layers.{i}/act")[0]
        mlp_out = g.node("MatMul", [act, g.weight(f"layers.{i}.down_proj", w(f"{p}.mlp.down_proj.weight").T)],
                         f"layers.{i}/down_proj")[0]

        if i + 1 < n_layers:
            next_norm = g.weight(f"layers.{i + 1}.input_norm", w(f"model.layers.{i + 1}.input_layernorm.weight"))
            name = f"layers.{i + 1}/input_norm"
        else:
            next_norm, name = g.weight("final_norm", w("model.norm.weight")), "final_norm"
        normed, _, _, residual = g.node("SkipSimplifiedLayerNormalization", [mlp_out, residual, next_norm],
                                        name, n_out=4, domain="com.microsoft", epsilon=dims.rms_norm_eps)

    # Logits only where the caller needs them: the lm_head over a whole prompt is ~20% of prefill.
    neg_keep = g.node("Neg", [io.num_logits_to_keep], "logits/neg")[0]
    start = g.node("Unsqueeze", [neg_keep, g.const_i64("axes_0", [0])], "logits/start")[0]
    kept = g.node("Slice", [normed, start, g.const_i64("int64_max", [int(INT64_MAX)]), g.const_i64("axes_1b", [1])],
                  "logits/slice")[0]
    lm_head = weights["lm_head.weight"] if "lm_head.weight" in weights else w("model.embed_tokens.weight")
    logits = g.node("MatMul", [kept, g.weight("lm_head", lm_head.astype(dtype).T)], "lm_head")[0]
    if onnx_type == TensorProto.FLOAT:
        g.nodes.append(helper.make_node("Identity", [logits], [io.logits], name="logits"))
    else:  # one V-sized cast on the device; the host samples from fp32 whatever the graph computes in
        g.nodes.append(helper.make_node("Cast", [logits], [io.logits], name="logits", to=TensorProto.FLOAT))

    inputs = [
        helper.make_tensor_value_info(io.input_ids, TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info(io.attention_mask, TensorProto.INT64, ["batch", "total_sequence"]),
        helper.make_tensor_value_info(io.num_logits_to_keep, TensorProto.INT64, []),
    ]
    outputs = [helper.make_tensor_value_info(io.logits, TensorProto.FLOAT, ["batch", "kept", dims.vocab_size])]
    for i in range(n_layers):
        for past, present in ((io.past_key[i], io.present_key[i]), (io.past_value[i], io.present_value[i])):
            inputs.append(helper.make_tensor_value_info(past, onnx_type, kv_shape))
            outputs.append(helper.make_tensor_value_info(present, onnx_type, kv_shape))
    graph = helper.make_graph(g.nodes, "edgellm_decoder", inputs, outputs, initializer=g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                    helper.make_opsetid("com.microsoft", 1)],
                              producer_name="edgellm")
    model.ir_version = 10
    return model


def save_model(model: onnx.ModelProto, path: str) -> None:
    """Save with all weights in one external file beside the graph (the >2 GB protobuf limit, mmap on load)."""
    import os

    data_path = path + ".data"
    if os.path.exists(data_path):  # onnx appends to an existing data file instead of replacing it
        os.remove(data_path)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data", size_threshold=1024)
