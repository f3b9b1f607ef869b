"""Kernel twin rewrites: a layer tail into one `ai.edgellm.Q8Mlp` node, attention into `ai.edgellm.CachedAttention`,
then each layer's qkv MatMulQ8, CachedAttention and Q8Mlp into one `ai.edgellm.Q8Layer` node.

After the MatMulNBits -> MatMulQ8 swap, a layer still runs 11 nodes: qkv, attention, o_proj,
SkipSimplifiedLayerNormalization, gate_up, Split, Sigmoid, Mul, Mul, down_proj and the next
SkipSimplifiedLayerNormalization. onnxruntime spends microseconds on every node, and a decode step
of a 135M model is ~7 ms, so the 8 nodes from o_proj to the next norm become one Q8Mlp node
(edgellm/kernels/ort_op.cc) that computes the same thing in the same order:

    r = attn @ Wo + residual;  n = rms_norm(r) * gamma_post;  g = n @ Wgu;
    r2 = (silu(g[:I]) * g[I:]) @ Wd + r;  outputs rms_norm(r2) * gamma_next and r2.

Only the exact pattern is folded (each intermediate used once, the norms' unused outputs unused);
anything else is left alone, so a graph of another shape still runs, node by node. Q8Layer then saves
onnxruntime's per-node cost twice more a layer (a decode step runs 44 nodes instead of 104 for
SmolLM2-135M) and runs the same kernels in the same order, so its logits are bit-identical.
"""

from __future__ import annotations

import onnx
from onnx import helper

DOMAIN = "ai.edgellm"
MATMUL, MLP = "MatMulQ8", "Q8Mlp"
SKIP_NORM = "SkipSimplifiedLayerNormalization"


def _attribute(node: onnx.NodeProto, name: str):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return None


class _Edges:
    def __init__(self, graph: onnx.GraphProto) -> None:
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(node)
        self.outputs = {value.name for value in graph.output}

    def sole_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def unused(self, names) -> bool:
        return all(not name or (not self.consumers.get(name) and name not in self.outputs) for name in names)


def _swap_nodes(graph: onnx.GraphProto, replaced: dict[int, onnx.NodeProto], removed: set[int]) -> None:
    """Drop the nodes in `removed` (by id) and put each fused node where the group's node in `replaced` stood."""
    kept = [replaced.get(id(n), n) for n in graph.node if id(n) not in removed or id(n) in replaced]
    del graph.node[:]
    graph.node.extend(kept)


def _is_matmul(node: onnx.NodeProto | None) -> bool:
    return node is not None and node.op_type == MATMUL and node.domain == DOMAIN


def _match(post_norm: onnx.NodeProto, edges: _Edges) -> list[onnx.NodeProto] | None:
    """[o_proj, post_norm, gate_up, split, sigmoid, silu, act, down_proj, next_norm] or None."""
    if post_norm.op_type != SKIP_NORM or len(post_norm.input) != 3 or len(post_norm.output) < 4:
        return None
    o_proj = edges.producer.get(post_norm.input[0])
    if not _is_matmul(o_proj) or edges.sole_consumer(o_proj.output[0]) is not post_norm:
        return None
    gate_up = edges.sole_consumer(post_norm.output[0])
    if not _is_matmul(gate_up) or _attribute(gate_up, "N") % 2:
        return None
    split = edges.sole_consumer(gate_up.output[0])
    if split is None or split.op_type != "Split" or len(split.output) != 2:
        return None
    gate_users = edges.consumers.get(split.output[0], [])
    sigmoid = next((n for n in gate_users if n.op_type == "Sigmoid"), None)
    silu = next((n for n in gate_users if n.op_type == "Mul"), None)
    if len(gate_users) != 2 or sigmoid is None or silu is None or edges.sole_consumer(sigmoid.output[0]) is not silu:
        return None
    act = edges.sole_consumer(silu.output[0])
    if (act is None or act.op_type != "Mul" or set(act.input) != {silu.output[0], split.output[1]}
            or edges.sole_consumer(split.output[1]) is not act):
        return None
    down = edges.sole_consumer(act.output[0])
    if not _is_matmul(down):
        return None
    next_norm = edges.sole_consumer(down.output[0])
    if (next_norm is None or next_norm.op_type != SKIP_NORM or len(next_norm.input) != 3
            or next_norm.input[0] != down.output[0] or next_norm.input[1] != post_norm.output[3]
            or edges.sole_consumer(post_norm.output[3]) is not next_norm):
        return None
    if not edges.unused(post_norm.output[1:3]) or not edges.unused(next_norm.output[1:3]):
        return None
    if _attribute(post_norm, "epsilon") is None or _attribute(next_norm, "epsilon") is None:
        return None  # the contrib default would have to be restated here: fold only what states its epsilon
    hidden, intermediate = _attribute(o_proj, "N"), _attribute(gate_up, "N") // 2
    if _attribute(gate_up, "K") != hidden or _attribute(down, "K") != intermediate or _attribute(down, "N") != hidden:
        return None
    return [o_proj, post_norm, gate_up, split, sigmoid, silu, act, down, next_norm]


def fuse_decoder_layers(graph: onnx.GraphProto) -> int:
    """Replace every matching layer tail by a Q8Mlp node in place; return how many were folded."""
    edges = _Edges(graph)
    replaced: dict[int, onnx.NodeProto] = {}
    removed: set[int] = set()
    for node in graph.node:
        group = _match(node, edges)
        if group is None or any(id(n) in removed for n in group):
            continue
        o_proj, post_norm, gate_up, _, _, _, _, down, next_norm = group
        residual_out = (next_norm.output[3] if len(next_norm.output) > 3 and next_norm.output[3]
                        else f"{next_norm.name}/residual")
        fused = helper.make_node(
            MLP,
            [o_proj.input[0], post_norm.input[1], o_proj.input[1], o_proj.input[2], post_norm.input[2],
             gate_up.input[1], gate_up.input[2], down.input[1], down.input[2], next_norm.input[2]],
            [next_norm.output[0], residual_out], name=f"{post_norm.name}/q8mlp", domain=DOMAIN,
            hidden=_attribute(o_proj, "N"), intermediate=_attribute(gate_up, "N") // 2, attn=_attribute(o_proj, "K"),
            eps_post=float(_attribute(post_norm, "epsilon")), eps_next=float(_attribute(next_norm, "epsilon")))
        removed.update(id(n) for n in group)
        replaced[id(next_norm)] = fused
    if not replaced:
        return 0
    _swap_nodes(graph, replaced, removed)
    used = {name for node in graph.node for name in node.input}
    initializers = [t for t in graph.initializer if t.name in used]  # the Split sizes are no longer used
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    return len(replaced)


ATTENTION = "CachedAttention"


def _cached_attention(node: onnx.NodeProto, graph: onnx.GraphProto) -> onnx.NodeProto | None:
    """The CachedAttention node computing `node` (a GroupQueryAttention) exactly, or None if it cannot."""
    if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.input) != 9:
        return None
    qkv, key, value, past_key, past_value, seqlens_k, _total, cos, sin = node.input
    if key or value or not (past_key and past_value and seqlens_k and cos and sin) or len(node.output) != 3:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (attrs.get("do_rotary", 0) != 1 or attrs.get("rotary_interleaved", 0) != 0
            or attrs.get("local_window_size", -1) != -1 or attrs.get("softcap", 0.0) != 0.0
            or attrs.get("smooth_softmax", 0) != 0 or set(attrs) - {"do_rotary", "rotary_interleaved",
                                                                  "local_window_size", "softcap", "smooth_softmax",
                                                                  "num_heads", "kv_num_heads", "scale"}):
        return None
    tables = {t.name: t for t in graph.initializer if t.name in (cos, sin)}
    if cos not in tables or sin not in tables or len(tables[cos].dims) != 2:
        return None
    head = 2 * tables[cos].dims[1]
    scale = attrs.get("scale", 0.0) or head ** -0.5
    return helper.make_node(ATTENTION, [qkv, past_key, past_value, seqlens_k, cos, sin], list(node.output),
                            name=node.name, domain=DOMAIN, num_heads=attrs["num_heads"],
                            kv_num_heads=attrs["kv_num_heads"], scale=float(scale))


def replace_attention(graph: onnx.GraphProto) -> int:
    """Swap every GroupQueryAttention that CachedAttention computes exactly (packed qkv, rotary not interleaved,
    no window, no softcap) for it, in place; return how many. Its decode step skips onnxruntime's two MLAS calls
    per head (~40 us a layer at 1 thread for SmolLM2-135M)."""
    swapped = 0
    for index, node in enumerate(graph.node):
        replacement = _cached_attention(node, graph)
        if replacement is not None:
            graph.node[index].CopyFrom(replacement)
            swapped += 1
    return swapped


LAYER = "Q8Layer"


def _layer_chain(attention: onnx.NodeProto, edges: _Edges) -> tuple[onnx.NodeProto, onnx.NodeProto] | None:
    """(qkv MatMulQ8, Q8Mlp) around a CachedAttention node when the three form one layer exactly, else None."""
    if attention.op_type != ATTENTION or attention.domain != DOMAIN or len(attention.input) != 6:
        return None
    qkv = edges.producer.get(attention.input[0])
    if not _is_matmul(qkv) or edges.sole_consumer(qkv.output[0]) is not attention:
        return None
    mlp = edges.sole_consumer(attention.output[0])
    if mlp is None or mlp.op_type != MLP or mlp.domain != DOMAIN or mlp.input[0] != attention.output[0]:
        return None
    heads, kv_heads, attn = (_attribute(attention, "num_heads"), _attribute(attention, "kv_num_heads"),
                             _attribute(mlp, "attn"))
    if not heads or attn % heads or _attribute(qkv, "K") != _attribute(mlp, "hidden"):
        return None
    if _attribute(qkv, "N") != (heads + 2 * kv_heads) * (attn // heads):
        return None
    return qkv, mlp


def fuse_layer_nodes(graph: onnx.GraphProto) -> int:
    """Fold each layer's qkv MatMulQ8 -> CachedAttention -> Q8Mlp chain into one Q8Layer node in place (the same
    math in the same order, so the logits stay bit-identical); return how many. Run it last: it takes the three
    nodes' inputs as they are (fp16 scales included)."""
    edges = _Edges(graph)
    replaced: dict[int, onnx.NodeProto] = {}
    removed: set[int] = set()
    for node in graph.node:
        chain = _layer_chain(node, edges)
        if chain is None:
            continue
        qkv, mlp = chain
        attention = node
        attrs = {a.name: helper.get_attribute_value(a) for a in (*mlp.attribute, *attention.attribute)}
        fused = helper.make_node(
            LAYER,
            [qkv.input[0], mlp.input[1], qkv.input[1], qkv.input[2], *attention.input[1:6], *mlp.input[2:10]],
            [mlp.output[0], mlp.output[1], attention.output[1], attention.output[2]],
            name=f"{attention.name}/q8layer", domain=DOMAIN, **attrs)
        removed.update((id(qkv), id(attention), id(mlp)))
        replaced[id(mlp)] = fused
    _swap_nodes(graph, replaced, removed)
    return len(replaced)
