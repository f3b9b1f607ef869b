"""ai.edgellm.Q8Mlp against the 8 nodes it replaces (edgellm.convert.fuse_layers), in real onnxruntime.

A layer tail built node by node (MatMulQ8 o_proj, SkipSimplifiedLayerNormalization, MatMulQ8 gate_up, Split,
Sigmoid, Mul, Mul, MatMulQ8 down_proj, SkipSimplifiedLayerNormalization) is folded by fuse_decoder_layers and
both graphs run on the same inputs. The fused node re-quantizes the same activations, so its outputs match to
float rounding (a flipped int8 rounding moves a value by one quantization step at most).
"""

from __future__ import annotations

import platform
import sys

import numpy as np
import pytest


X86_LINUX = platform.machine().lower() in {"x86_64", "amd64"} and sys.platform.startswith("linux")
pytestmark = pytest.mark.skipif(not X86_LINUX, reason=f"edgellm's kernels are built for x86-64 Linux only, "
                                                      f"this is {sys.platform} {platform.machine()}")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx", reason="onnx (the [convert] extra) builds the test graphs")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgellm.convert.fuse_layers import fuse_decoder_layers  # noqa: E402

H, I = 64, 96  # hidden, intermediate: multiples of 32 like every real model's


def q8_matrix(rng: np.random.Generator, inits: list, name: str, K: int, N: int) -> list[str]:
    """Random int8 block weights NAME.B [N, K/32, 32] and fp16 scales NAME.S appended to `inits`; their names."""
    inits.append(numpy_helper.from_array(rng.integers(0, 256, (N, K // 32, 32), dtype=np.uint8), f"{name}.B"))
    scales = (rng.random(N * K // 32, dtype=np.float32) * 0.01 + 0.002).astype(np.float16)
    inits.append(numpy_helper.from_array(scales, f"{name}.S"))
    return [f"{name}.B", f"{name}.S"]


def weights_fed_at_run_time(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A copy of `model` whose .B / .S matrices are graph inputs instead of initializers, and their values."""
    fed = onnx.ModelProto()
    fed.CopyFrom(model)
    matrices = [t for t in fed.graph.initializer if t.name.endswith((".B", ".S"))]
    weights = {t.name: numpy_helper.to_array(t) for t in matrices}
    for t in matrices:
        fed.graph.initializer.remove(t)
        kind = TensorProto.UINT8 if t.name.endswith(".B") else TensorProto.FLOAT16
        fed.graph.input.append(helper.make_tensor_value_info(t.name, kind, list(weights[t.name].shape)))
    return fed, weights


def layer_tail(eps_next: float | None = 1e-5) -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    inits = []
    q8 = lambda name, K, N: q8_matrix(rng, inits, name, K, N)  # noqa: E731

    for name in ("gamma_post", "gamma_next"):
        inits.append(numpy_helper.from_array((1 + 0.1 * rng.standard_normal(H)).astype(np.float32), name))
    inits.append(numpy_helper.from_array(np.array([I, I], np.int64), "split"))
    mm = lambda name, x, K, N: helper.make_node("MatMulQ8", [x] + q8(name, K, N), [f"{name}.y"], name=name,  # noqa: E731
                                                 domain="ai.edgellm", K=K, N=N, bits=8, block_size=32)
    next_attrs = {} if eps_next is None else {"epsilon": eps_next}
    nodes = [
        mm("o", "attn", H, H),
        helper.make_node("SkipSimplifiedLayerNormalization", ["o.y", "residual", "gamma_post"],
                         ["post", "p1", "p2", "post_sum"], name="post", domain="com.microsoft", epsilon=1e-5),
        mm("gu", "post", H, 2 * I),
        helper.make_node("Split", ["gu.y", "split"], ["g", "u"], name="split", axis=-1),
        helper.make_node("Sigmoid", ["g"], ["sg"], name="sigmoid"),
        helper.make_node("Mul", ["g", "sg"], ["silu"], name="silu"),
        helper.make_node("Mul", ["silu", "u"], ["act"], name="act"),
        mm("d", "act", I, H),
        helper.make_node("SkipSimplifiedLayerNormalization", ["d.y", "post_sum", "gamma_next"],
                         ["next", "n1", "n2", "next_sum"], name="next", domain="com.microsoft", **next_attrs),
    ]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "s", H])  # noqa: E731
    graph = helper.make_graph(nodes, "tail", [value("attn"), value("residual")], [value("next"), value("next_sum")],
                              initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.edgellm", 1), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def run(model: onnx.ModelProto, library, feed: dict, threads: int) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize("rows", [1, 3, 21])
@pytest.mark.parametrize("threads", [1, 2])
def test_q8mlp_matches_the_nodes_it_replaces(kernel_library, rows, threads):
    unfused = layer_tail()
    fused = layer_tail()
    assert fuse_decoder_layers(fused.graph) == 1
    assert [n.op_type for n in fused.graph.node] == ["Q8Mlp"]
    assert not any(t.name == "split" for t in fused.graph.initializer)  # the unused Split sizes are dropped
    rng = np.random.default_rng(rows)
    feed = {"attn": rng.standard_normal((1, rows, H)).astype(np.float32),
            "residual": rng.standard_normal((1, rows, H)).astype(np.float32)}
    want_next, want_sum = run(unfused, kernel_library, feed, threads)
    got_next, got_sum = run(fused, kernel_library, feed, threads)
    assert got_next.shape == want_next.shape == (1, rows, H)
    np.testing.assert_allclose(got_sum, want_sum, rtol=0, atol=1e-3 * np.abs(want_sum).max())
    np.testing.assert_allclose(got_next, want_next, rtol=0, atol=1e-3 * np.abs(want_next).max())
    # and it is not trivially equal: the residual path really went through both matmuls
    assert np.abs(want_sum - feed["residual"]).max() > 0.1


def test_a_tail_that_does_not_state_its_epsilon_is_left_alone():
    model = layer_tail(eps_next=None)
    before = [n.op_type for n in model.graph.node]
    assert fuse_decoder_layers(model.graph) == 0
    assert [n.op_type for n in model.graph.node] == before


def test_a_shared_intermediate_is_left_alone():
    model = layer_tail()
    model.graph.output.append(helper.make_tensor_value_info("act", TensorProto.FLOAT, None))  # act read outside
    assert fuse_decoder_layers(model.graph) == 0


@pytest.mark.parametrize("rows", [1, 5])
def test_q8mlp_with_weights_fed_at_run_time_matches_constant_weights(kernel_library, rows):
    """Constant matrices are packed at load (q8_kernel.c, PACK_PAIR); matrices fed as graph inputs take the row
    kernels on MatMulNBits' layout at every call. Both give the same layer."""
    constant = layer_tail()
    assert fuse_decoder_layers(constant.graph) == 1
    fed, weights = weights_fed_at_run_time(constant)
    assert len(weights) == 6
    rng = np.random.default_rng(rows)
    feed = {"attn": rng.standard_normal((1, rows, H)).astype(np.float32),
            "residual": rng.standard_normal((1, rows, H)).astype(np.float32)}
    want_next, want_sum = run(constant, kernel_library, feed, 2)
    got_next, got_sum = run(fed, kernel_library, feed | weights, 2)
    np.testing.assert_allclose(got_sum, want_sum, rtol=0, atol=1e-3 * np.abs(want_sum).max())
    np.testing.assert_allclose(got_next, want_next, rtol=0, atol=1e-3 * np.abs(want_next).max())
    assert np.abs(want_sum - feed["residual"]).max() > 0.1
