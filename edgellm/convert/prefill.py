"""The prefill graph (`convert --prefill-graph`): the int8 model's twin for prompts, built for many rows at once.

onnxruntime's MatMulNBits (block-wise int8 weights, accuracy_level 4) is the fastest kernel for decoding one
token, but with many rows it runs at about a third of what MLAS's int8 GEMM (QGEMM, the kernel behind
MatMulIntegerToFloat) reaches on the same CPU: 970 vs 350 µs for a 38x576 by 576x3072 product on one
AVX-512-VNNI core. QGEMM takes one scale per weight column and per activation row, not per block of 32, so
the prefill graph stores each layer MatMul as

    per-channel symmetric int8 weights, quantized from the fp32 export (one rounding, not two)
    per-row symmetric int8 activations, quantized in the graph:  s = max|x_row| / 127,  q = round(x / s) + 128
    y = MatMulIntegerToFloat(q, W, 1, w_scale, 128) * s

Everything else (embedding, attention, norms, the lm_head on the kept rows) is the int8 graph's own. Both
graphs read and write the same KV cache buffers (edgellm.runtime.session runs prompts of
PREFILL_GRAPH_MIN_TOKENS or more through this one), and the convert gate measures perplexity and agreement
through it, since that is the path prompts take.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ModelFormatError

WEIGHT_SUFFIX = "_Q8"  # onnxruntime's MatMulNBitsQuantizer names a quantized weight NAME + "_Q8"


def _per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(K, N) fp32 -> (K, N) int8 and (N,) scales, symmetric per output column."""
    scales = np.abs(weight).max(axis=0) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(weight / scales), -127, 127).astype(np.int8)
    return np.ascontiguousarray(q), scales.astype(np.float32)


def _dequantized(node: onnx.NodeProto, inits: dict) -> np.ndarray:
    """A symmetric 8-bit MatMulNBits' weights back as (K, N) fp32 (when the fp32 graph lacks them)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("bits") != 8 or len(node.input) > 3 and node.input[3]:
        raise ModelFormatError(f"{node.name} is not a symmetric 8-bit MatMulNBits; the prefill graph needs int8.")
    k, n = attrs["K"], attrs["N"]
    q = numpy_helper.to_array(inits[node.input[1]]).astype(np.int16) - 128
    s = numpy_helper.to_array(inits[node.input[2]]).reshape(n, -1)
    return np.ascontiguousarray((q * s[:, :, None]).reshape(n, -1)[:, :k].T.astype(np.float32))


def build_prefill_graph(int8_model: onnx.ModelProto, fp32_model: onnx.ModelProto | None = None) -> onnx.ModelProto:
    """The prefill twin of an int8 graph (see the module doc); the lm_head stays MatMulNBits.

    fp32_model: the export the int8 graph was quantized from (weights looked up by name); without it, the int8
    graph's block-wise weights are re-quantized. Measured on SmolLM2-135M-Instruct (gate text and windows):
    from fp32 held-out perplexity 43.82, agreement 0.923, and the gate passed; re-quantized 43.58 / 0.929, but
    its one-pass vs step-by-step logits differed by 3.9 (int8 limit 2.5); MSE-clipped scales 44.12 / 0.923."""
    model = onnx.ModelProto()
    model.CopyFrom(int8_model)
    inits = {i.name: i for i in model.graph.initializer}
    fp32 = {i.name: i for i in fp32_model.graph.initializer} if fp32_model is not None else {}
    consts = {"prefill/one": np.array(1.0, np.float32), "prefill/inv127": np.array(1 / 127, np.float32),
              "prefill/eps": np.array(1e-30, np.float32), "prefill/zp": np.array(128, np.uint8),
              "prefill/last_axis": np.array([-1], np.int64)}
    added = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    dropped: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    converted = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits" or node.name.startswith("lm_head"):
            nodes.append(node)
            continue
        source = node.input[1].removesuffix(WEIGHT_SUFFIX)
        weight = numpy_helper.to_array(fp32[source]) if source in fp32 else _dequantized(node, inits)
        q, scales = _per_channel(weight)
        p = node.name.removesuffix(WEIGHT_SUFFIX)
        added += [numpy_helper.from_array(q, f"{p}/w_int8"), numpy_helper.from_array(scales, f"{p}/w_scale")]
        dropped.update(name for name in node.input[1:] if name)
        x, y = node.input[0], node.output[0]
        nodes += [
            helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/abs"),
            helper.make_node("ReduceMax", [f"{p}/abs", "prefill/last_axis"], [f"{p}/absmax"], name=f"{p}/absmax",
                             keepdims=1),
            helper.make_node("Max", [f"{p}/absmax", "prefill/eps"], [f"{p}/absmax_pos"], name=f"{p}/absmax_pos"),
            helper.make_node("Mul", [f"{p}/absmax_pos", "prefill/inv127"], [f"{p}/x_scale"], name=f"{p}/x_scale"),
            helper.make_node("Div", [x, f"{p}/x_scale"], [f"{p}/x_scaled"], name=f"{p}/x_scaled"),
            helper.make_node("QuantizeLinear", [f"{p}/x_scaled", "prefill/one", "prefill/zp"], [f"{p}/x_uint8"],
                             name=f"{p}/x_uint8"),
            helper.make_node("MatMulIntegerToFloat", [f"{p}/x_uint8", f"{p}/w_int8", "prefill/one", f"{p}/w_scale",
                                                      "prefill/zp"], [f"{p}/y_rows"], name=f"{p}/qgemm",
                             domain="com.microsoft"),
            helper.make_node("Mul", [f"{p}/y_rows", f"{p}/x_scale"], [y], name=f"{p}/y"),
        ]
        converted += 1
    if converted == 0:
        raise ModelFormatError("the graph has no layer MatMulNBits to build a prefill graph from.")
    still_used = {name for n in nodes for name in n.input}
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [i for i in model.graph.initializer if i.name not in dropped or i.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + added)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


__all__ = ["build_prefill_graph"]
