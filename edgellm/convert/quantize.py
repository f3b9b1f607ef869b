"""int8 weight-only quantization of the exported decoder.

The scheme, and why (measured on SmolLM2-135M, see README "Why this int8 scheme"):
- Every MatMul becomes onnxruntime's MatMulNBits, 8-bit, symmetric, blocks of 32 along K,
  accuracy_level 4 (int8 activations inside the kernel, fp32 accumulation). Block scales
  follow the weight outliers that a per-tensor scale would crush, and accuracy_level 4 is the fast
  int8 path (benchmarks/int8_schemes.json: accuracy_level 1 is many times slower per token).
- The lm_head is quantized too, and, when the source ties them (config.tie_word_embeddings and
  the two tensors equal), the input embedding reads the very same int8 bytes through
  GatherBlockQuantized, so the tied 49k x 576 matrix is stored once, in int8. An untied
  embedding (e.g. TinyLlama) keeps its own fp32 table: it is read one row per token, so it
  costs memory, not speed.
Both steps use onnxruntime's own quantizer and kernels; the only hand-written part is
re-tying the embedding, which the library quantizer supports for 4 bits only.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelFormatError

logger = logging.getLogger(__name__)

BLOCK_SIZE = 32
BITS = 8
ACCURACY_LEVEL = 4


def quantize_int8(model: onnx.ModelProto, block_size: int = BLOCK_SIZE, accuracy_level: int = ACCURACY_LEVEL,
                  tied: bool = False) -> onnx.ModelProto:
    """Return a weight-only int8 copy of an fp32 decoder built by edgellm.convert.graph.

    tied: the source config says tie_word_embeddings. The embedding is re-tied to the int8 lm_head only
    if that is so AND the graph's two tensors are equal; otherwise it stays a separate fp32 table.
    """
    retie = tied and embedding_equals_lm_head(model)
    if tied and not retie:
        logger.warning("the config ties the embedding to the lm_head, but the weights differ: keeping both")
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(
        block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
        quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=BITS,
    )
    quantizer = MatMulNBitsQuantizer(model, bits=BITS, block_size=block_size, is_symmetric=True,
                                     accuracy_level=accuracy_level, algo_config=config)
    quantizer.process()
    quantized = quantizer.model.model
    if retie:
        tie_embedding_to_lm_head(quantized, block_size)
    return quantized


def _embed_and_lm_head(model: onnx.ModelProto) -> tuple[onnx.NodeProto, onnx.NodeProto]:
    lm_head = next((n for n in model.graph.node if n.output and n.output[0] == "lm_head/out0"), None)
    embed = next((n for n in model.graph.node if n.op_type == "Gather" and n.name == "embed"), None)
    if lm_head is None or embed is None:
        raise ModelFormatError("the exported graph has no lm_head / embedding Gather node, so it was not built by "
                               "edgellm.convert.graph. Fix: quantize graphs that `edgellm convert` exported.")
    return embed, lm_head


def embedding_equals_lm_head(model: onnx.ModelProto) -> bool:
    """True if the fp32 graph's embedding table (V, K) equals its lm_head MatMul weight (K, V) transposed."""
    embed, lm_head = _embed_and_lm_head(model)
    if lm_head.op_type != "MatMul":
        return False
    inits = {t.name: t for t in model.graph.initializer}
    if embed.input[0] not in inits or lm_head.input[1] not in inits:
        return False
    table, head = (numpy_helper.to_array(inits[name]) for name in (embed.input[0], lm_head.input[1]))
    return table.shape == head.T.shape and bool(np.array_equal(table, head.T))


def tie_embedding_to_lm_head(model: onnx.ModelProto, block_size: int) -> None:
    """Replace the fp32 embedding Gather with GatherBlockQuantized over the lm_head's int8 weight.

    MatMulNBits stores the lm_head as uint8 (V, K/block, block) with scales (V, K/block) and an
    implicit zero point of 128: row v of that tensor is exactly token v's embedding, quantized.
    """
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    embed, lm_head = _embed_and_lm_head(model)
    if lm_head.op_type != "MatMulNBits":
        raise ModelFormatError(f"the lm_head is a {lm_head.op_type}, not an int8 MatMulNBits, so the embedding "
                               "cannot read its bytes. Fix: tie only after quantize_int8 quantized the lm_head.")
    embed_weight = embed.input[0]
    source = numpy_helper.to_array(inits[embed_weight])
    weight_name, scales_name = lm_head.input[1], lm_head.input[2]
    vocab, n_blocks = inits[scales_name].dims
    if tuple(source.shape) != (vocab, n_blocks * block_size):
        raise ModelFormatError(f"the embedding {source.shape} and the int8 lm_head ({vocab}, {n_blocks * block_size}) "
                               "differ in shape, so they cannot share one table. Fix: convert with tied=False.")

    scales = numpy_helper.to_array(inits[scales_name]).reshape(vocab, n_blocks, 1)
    gather_scales = numpy_helper.from_array(np.ascontiguousarray(scales), "embed/scales")
    zero_points = numpy_helper.from_array(np.full((vocab, n_blocks, 1), 128, dtype=np.uint8), "embed/zero_points")
    shape = numpy_helper.from_array(np.array([0, 0, n_blocks * block_size], dtype=np.int64), "embed/shape")
    graph.initializer.extend([gather_scales, zero_points, shape])

    index = list(graph.node).index(embed)
    gathered = "embed/quantized"
    new_nodes = [
        helper.make_node("GatherBlockQuantized", [weight_name, embed.input[1], "embed/scales", "embed/zero_points"],
                         [gathered], name="embed/gather_quantized", domain="com.microsoft",
                         gather_axis=0, quantize_axis=2, block_size=block_size, bits=BITS),
        helper.make_node("Reshape", [gathered, "embed/shape"], list(embed.output), name="embed/reshape"),
    ]
    graph.node.remove(embed)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(index + offset, node)
    if not any(embed_weight in n.input for n in graph.node):
        graph.initializer.remove(inits[embed_weight])
    logger.debug("embedding tied to the int8 lm_head (%s)", weight_name)


# --- int4: mixed 4/8-bit ------------------------------------------------------------------------------------------
# Measured on SmolLM2-135M-Instruct (held-out perplexity vs fp32, 2048 tokens, windows of 512; decode vs int8, same
# process): every projection 4-bit round-to-nearest x1.19; first/last block 8-bit x1.095 (decode 0.75x int8);
# + down_proj 8-bit everywhere x1.067; first/last 2 blocks and down_proj 8-bit x1.056 (what we ship). Error-aware fits did not pay here: onnxruntime's HQQ reached x1.002 (the
# source weights sit on a 4-bit grid, Q4_1, with float offsets, which HQQ's float zero points fit), but
# MatMulNBits with float zero points runs 12x slower than int8 on the CPU; k-quant (integer zero points) x1.10.
INT4_BLOCK_SIZE = 32
INT4_EDGE_BLOCKS = 2
INT4_INT8_PROJECTIONS = ("down_proj",)
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def int8_keeps(num_layers: int, edge_blocks: int = INT4_EDGE_BLOCKS,
               everywhere: tuple[str, ...] = INT4_INT8_PROJECTIONS) -> list[str]:
    """MatMul node names kept at 8 bits in an int4 model: the lm_head (its int8 bytes are the embedding too),
    every projection of the first and last `edge_blocks` blocks, and the `everywhere` projections of every block."""
    edge = sorted({*range(min(edge_blocks, num_layers)), *range(max(0, num_layers - edge_blocks), num_layers)})
    keep = ["lm_head"] + [f"layers.{i}/{proj}" for i in edge for proj in PROJECTIONS]
    return keep + [f"layers.{i}/{proj}" for i in range(num_layers) for proj in everywhere if i not in edge]


def quantize_int4(model: onnx.ModelProto, keep_int8: list[str], block_size: int = INT4_BLOCK_SIZE,
                  accuracy_level: int = ACCURACY_LEVEL, tied: bool = False) -> onnx.ModelProto:
    """Mixed 4/8-bit weight-only copy of an fp32 decoder built by edgellm.convert.graph.

    MatMuls not in keep_int8 become 4-bit MatMulNBits, block-wise, asymmetric with uint4 zero points (onnxruntime's
    quantizer, round-to-nearest); keep_int8 ones are quantized like quantize_int8 (and the embedding tied to the int8
    lm_head). Every MatMulNBits runs with accuracy_level (4: int8 activations, the fast path)."""
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    names = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    missing = [k for k in keep_int8 if k not in names]
    if missing:
        raise ValueError(f"int8 layers {missing} are not MatMul nodes of this graph")
    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, accuracy_level=accuracy_level,
                                          quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",), bits=4)
    quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, is_symmetric=False,
                                     accuracy_level=accuracy_level, nodes_to_exclude=list(keep_int8),
                                     algo_config=config)
    quantizer.process()
    # the remaining MatMuls at 8 bits, and the embedding re-tied to the int8 lm_head when the source ties them
    return quantize_int8(quantizer.model.model, BLOCK_SIZE, accuracy_level, tied=tied)


def bits_by_layer(model: onnx.ModelProto) -> dict[str, int]:
    """MatMulNBits node name -> bits (what the manifest records)."""
    out = {}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            out[node.name.removesuffix(f"_Q{bits}")] = bits  # the quantizer appends _Q4 / _Q8
    return out


# --- a cheaper lm_head: 4-bit head over an int8 model ---------------------------------------------------------------
# The tied 49k x 576 lm_head is the only weight read in full for every token that is not a layer (21% of the bytes
# of a SmolLM2-135M int8 step); the embedding reads one row per token. So the head can drop to 4 bits while the
# embedding keeps its int8 table (the head's former bytes, now read only by GatherBlockQuantized): more on disk,
# fewer bytes per token. Measured in benchmarks/head_bits.json (scripts/bench_head_bits.py).
HEAD_METHODS = ("k_quant", "rtn", "rtn_sym")
HEAD_BLOCK_SIZE = 32     # blocks of 64 / 128: perplexity x1.04+ even with rescoring (benchmarks/head_bits.json)
HEAD_METHOD = "rtn"      # k_quant fits each block closer but its tail logits score worse here
HEAD_RESCORE_TOP_K = 128  # int8 values for the top 128, blended over the next 128 (benchmarks/head_bits.json)


def lm_head_weight(model: onnx.ModelProto) -> np.ndarray:
    """The fp32 lm_head weight (K, V) of a graph built by edgellm.convert.graph, before quantization."""
    _, lm_head = _embed_and_lm_head(model)
    inits = {t.name: t for t in model.graph.initializer}
    if lm_head.op_type != "MatMul" or lm_head.input[1] not in inits:
        raise ModelFormatError(f"the lm_head is a {lm_head.op_type} without an fp32 weight initializer. Fix: read the "
                               "head weight from the fp32 graph, before quantize_int8.")
    return numpy_helper.to_array(inits[lm_head.input[1]])


def quantize_lm_head(model: onnx.ModelProto, weight: np.ndarray, bits: int = 4, block_size: int = INT4_BLOCK_SIZE,
                     method: str = "k_quant", accuracy_level: int = ACCURACY_LEVEL) -> onnx.ModelProto:
    """Refit the lm_head of a quantize_int8 graph at 4 bits from its fp32 `weight` (K, V), in place; returns `model`.

    Blocks of block_size along K, asymmetric with uint4 zero points ("rtn_sym": symmetric, none), fitted by
    onnxruntime's (vendored neural-compressor) routines: "k_quant" searches each block's scale and minimum for the
    least weighted squared error (llama.cpp's k-quant fit), "rtn" rounds min/max to nearest. The new MatMulNBits gets its own initializers; the int8 bytes stay
    for the embedding's GatherBlockQuantized, which reads one row of them per token."""
    if method not in HEAD_METHODS:
        raise ValueError(f"head method {method!r} is not one of {', '.join(HEAD_METHODS)}")
    if bits != 4 or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"head bits={bits} / block_size={block_size}: bits must be 4, the block a power of 2 >= 16")
    from onnxruntime.quantization.neural_compressor.weight_only import quant_tensor, quant_tensor_k_quant_cpu

    old = next((n for n in model.graph.node if n.output and n.output[0] == "lm_head/out0"), None)
    if old is None or old.op_type != "MatMulNBits":
        raise ModelFormatError("the graph has no MatMulNBits lm_head (output lm_head/out0). Fix: refit the head of "
                               "a graph that quantize_int8 quantized.")
    k, v = weight.shape
    n_blocks = -(-k // block_size)
    rows = np.zeros((v, n_blocks * block_size), dtype=np.float32)  # (V, K padded): one output row per vocabulary entry
    rows[:, :k] = weight.T
    if method == "k_quant":
        q, scale, zero = quant_tensor_k_quant_cpu(rows, 4, block_size)
    else:
        q, scale, zero = quant_tensor(rows, 4, block_size, "asym" if method == "rtn" else "sym", "uint")
    q = q.astype(np.uint8).reshape(v, n_blocks, block_size)
    packed = q[..., 0::2] | (q[..., 1::2] << 4)  # MatMulNBits: element 2i in the low nibble of byte i
    zero = np.pad(zero.astype(np.uint8).reshape(v, n_blocks), ((0, 0), (0, n_blocks % 2)))
    packed_zero = zero[:, 0::2] | (zero[:, 1::2] << 4)
    prefix = f"lm_head/q4b{block_size}/"
    inputs = [old.input[0], prefix + "weight", prefix + "scales"]
    if method != "rtn_sym":  # symmetric: MatMulNBits' implicit zero point 8
        inputs.append(prefix + "zero_points")
    model.graph.initializer.extend([
        numpy_helper.from_array(np.ascontiguousarray(packed), prefix + "weight"),
        numpy_helper.from_array(scale.astype(np.float32).reshape(v, n_blocks), prefix + "scales")])
    if method != "rtn_sym":
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(packed_zero),
                                                               prefix + "zero_points"))
    new = helper.make_node("MatMulNBits", inputs,
                           list(old.output), name="lm_head_Q4", domain="com.microsoft", K=k, N=v, bits=4,
                           block_size=block_size, accuracy_level=accuracy_level)
    index = list(model.graph.node).index(old)
    model.graph.node.remove(old)
    model.graph.node.insert(index, new)
    used = {i for n in model.graph.node for i in n.input}
    for init in [t for t in model.graph.initializer if t.name in old.input[1:] and t.name not in used]:
        model.graph.initializer.remove(init)
    return model


def rescore_lm_head_top_k(model: onnx.ModelProto, top_k: int) -> onnx.ModelProto:
    """After quantize_lm_head on a tied graph: recompute the largest 4-bit logits of each position from the int8 rows
    the embedding reads (dequantized, fp32 dot products), in place; returns `model`.

    The `top_k` largest take the int8 value; the next `top_k` a blend, from the int8 value at the top_k-th 4-bit
    logit down to the 4-bit value at the 2*top_k-th, so the logits stay continuous in the hidden state: a token that
    crosses the cut between one-pass and stepwise decoding moves a little, not by its whole 4-bit error (which broke
    the gate's KV-consistency limit with a hard cut). The argmax and the softmax mass live in the top logits, so
    these come out as the int8 head's while the full read of the vocabulary is 4-bit.
    Nodes: TopK -> GatherBlockQuantized (2*top_k int8 rows) -> MatMul -> blend -> ScatterElements.
    """
    graph = model.graph
    head = next((n for n in graph.node if n.output and n.output[0] == "lm_head/out0"), None)
    embed = next((n for n in graph.node if n.op_type == "GatherBlockQuantized" and n.name == "embed/gather_quantized"),
                 None)
    if head is None or embed is None or next((a.i for a in head.attribute if a.name == "bits"), 0) != 4:
        raise ModelFormatError("rescoring needs a 4-bit lm_head and the int8 embedding table it was tied to. Fix: "
                               "call quantize_lm_head on a tied quantize_int8 graph first.")
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be 1 or more")
    top_k = min(top_k, next(a.i for a in head.attribute if a.name == "N") // 2)  # a small vocabulary
    hidden, approx, t = head.input[0], "lm_head/q4/out0", "lm_head/top/"
    head.output[0] = approx

    def const(name: str, values: list, dtype=np.int64) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=dtype), t + name))
        return t + name

    last = const("last_axis", [-1])
    attrs = {a.name: helper.get_attribute_value(a) for a in embed.attribute}
    nodes = [
        helper.make_node("TopK", [approx, const("k", [2 * top_k])], [t + "values", t + "ids"], name=t + "topk",
                         axis=-1, largest=1, sorted=1),                                # (B, S, 2k), descending
        helper.make_node("GatherBlockQuantized", [embed.input[0], t + "ids", *embed.input[2:]], [t + "rows_q"],
                         name=t + "gather", domain="com.microsoft", **attrs),
        helper.make_node("Reshape", [t + "rows_q", const("rows_shape", [0, 0, 2 * top_k, -1])], [t + "rows"],
                         name=t + "reshape"),                                          # (B, S, 2k, K)
        helper.make_node("Unsqueeze", [hidden, last], [t + "hidden"], name=t + "unsqueeze"),  # (B, S, K, 1)
        helper.make_node("MatMul", [t + "rows", t + "hidden"], [t + "exact1"], name=t + "matmul"),  # (B, S, 2k, 1)
        helper.make_node("Squeeze", [t + "exact1", last], [t + "exact"], name=t + "squeeze"),
        # weight of the int8 value: 1 down to the top_k-th 4-bit logit (hi), 0 at the 2*top_k-th (lo)
        helper.make_node("Slice", [t + "values", const("hi_start", [top_k - 1]), const("hi_end", [top_k]), last],
                         [t + "hi"], name=t + "hi"),
        helper.make_node("Slice", [t + "values", const("lo_start", [2 * top_k - 1]), const("lo_end", [2 * top_k]),
                                   last], [t + "lo"], name=t + "lo"),
        helper.make_node("Sub", [t + "values", t + "lo"], [t + "above"], name=t + "above"),
        helper.make_node("Sub", [t + "hi", t + "lo"], [t + "span0"], name=t + "span0"),
        helper.make_node("Max", [t + "span0", const("eps", 1e-6, np.float32)], [t + "span"], name=t + "span"),
        helper.make_node("Div", [t + "above", t + "span"], [t + "w0"], name=t + "w0"),
        helper.make_node("Clip", [t + "w0", const("zero", 0.0, np.float32), const("one", 1.0, np.float32)],
                         [t + "w"], name=t + "w"),
        helper.make_node("Sub", [t + "exact", t + "values"], [t + "delta"], name=t + "delta"),
        helper.make_node("Mul", [t + "w", t + "delta"], [t + "shift"], name=t + "shift"),
        helper.make_node("Add", [t + "values", t + "shift"], [t + "blended"], name=t + "blended"),
        helper.make_node("ScatterElements", [approx, t + "ids", t + "blended"], ["lm_head/out0"], name=t + "scatter",
                         axis=-1),
    ]
    index = list(graph.node).index(head) + 1
    for offset, node in enumerate(nodes):
        graph.node.insert(index + offset, node)
    return model
