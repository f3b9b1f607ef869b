"""ai.edgellm.Q8Layer against the three nodes it replaces (MatMulQ8 qkv -> CachedAttention -> Q8Mlp), in real
onnxruntime, through a prompt and then decode steps that feed each step's caches to the next.

fuse_layer_nodes folds the three nodes into one that runs the same kernels in the same order, so every output
(the next normed input, the residual and both caches) must be bit-identical, at 1 and 2 threads, with weights
packed at load and with weights fed at run time, and whether a decode step runs as one parallel region or not;
bad shapes fail at the call with the node's name.
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

from edgellm.convert.fuse_layers import fuse_layer_nodes  # noqa: E402
from tests.test_kernel_layer_fusion import q8_matrix, weights_fed_at_run_time  # noqa: E402

HIDDEN, INTER, HEADS, KV_HEADS, D, CAPACITY = 64, 96, 2, 1, 64, 24  # D = 64: attention's AVX-512 path
ATTN, QKV = HEADS * D, (HEADS + 2 * KV_HEADS) * D


def three_nodes(x_width=HIDDEN) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    inits = []
    q8 = lambda name, K, N: q8_matrix(rng, inits, name, K, N)  # noqa: E731

    for name in ("gamma_post", "gamma_next"):
        inits.append(numpy_helper.from_array((1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), name))
    angles = np.outer(np.arange(CAPACITY + 8), 1.0 / (10000 ** (np.arange(0, D, 2) / D)))
    inits += [numpy_helper.from_array(np.cos(angles).astype(np.float32), "cos"),
              numpy_helper.from_array(np.sin(angles).astype(np.float32), "sin")]
    nodes = [
        helper.make_node("MatMulQ8", ["x"] + q8("qkv", HIDDEN, QKV), ["qkv.y"], name="qkv", domain="ai.edgellm",
                         K=HIDDEN, N=QKV, bits=8, block_size=32),
        helper.make_node("CachedAttention", ["qkv.y", "past_key", "past_value", "seqlens_k", "cos", "sin"],
                         ["attn", "present_key", "present_value"], name="attn", domain="ai.edgellm",
                         num_heads=HEADS, kv_num_heads=KV_HEADS, scale=float(D ** -0.5)),
        helper.make_node("Q8Mlp", ["attn", "residual"] + q8("o", ATTN, HIDDEN)[:2] + ["gamma_post"]
                         + q8("gu", HIDDEN, 2 * INTER) + q8("d", INTER, HIDDEN) + ["gamma_next"],
                         ["next", "next_sum"], name="mlp", domain="ai.edgellm", hidden=HIDDEN, intermediate=INTER,
                         attn=ATTN, eps_post=1e-5, eps_next=1e-6),
    ]
    cache = ["b", KV_HEADS, CAPACITY, D]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", x_width]),
              helper.make_tensor_value_info("residual", TensorProto.FLOAT, ["b", "s", HIDDEN]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"])]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
               for n in ("next", "next_sum", "present_key", "present_value")]
    graph = helper.make_graph(nodes, "layer", inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.edgellm", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def one_node(model: onnx.ModelProto | None = None) -> onnx.ModelProto:
    fused = onnx.ModelProto()
    fused.CopyFrom(model or three_nodes())
    assert fuse_layer_nodes(fused.graph) == 1
    assert [(n.op_type, n.domain) for n in fused.graph.node] == [("Q8Layer", "ai.edgellm")]
    return fused


def session(model: onnx.ModelProto, library, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def steps(sess: ort.InferenceSession, extra: dict | None = None) -> list[list[np.ndarray]]:
    """A 5-token prompt, then 4 single tokens and a 3-token continuation, each step's caches fed to the next."""
    rng = np.random.default_rng(3)
    key = value = np.zeros((1, KV_HEADS, CAPACITY, D), np.float32)
    length, results = 0, []
    for count in (5, 1, 1, 1, 1, 3):
        length += count
        feed = {"x": rng.standard_normal((1, count, HIDDEN)).astype(np.float32),
                "residual": rng.standard_normal((1, count, HIDDEN)).astype(np.float32),
                "past_key": key, "past_value": value, "seqlens_k": np.array([length - 1], np.int32)}
        out = sess.run(None, feed | (extra or {}))
        key, value = out[2], out[3]
        results.append(out)
    return results


@pytest.mark.parametrize("threads", [1, 2])
def test_q8layer_is_bit_identical_to_the_three_nodes(kernel_library, threads):
    want = steps(session(three_nodes(), kernel_library, threads))
    got = steps(session(one_node(), kernel_library, threads))
    for step, (w, g) in enumerate(zip(want, got)):
        for name, a, b in zip(("next", "next_sum", "present_key", "present_value"), w, g):
            assert a.shape == b.shape and np.array_equal(a, b), f"step {step}: {name} differs"
    # not trivially equal: the caches filled up to the last position and the residual moved
    assert np.count_nonzero(np.abs(want[-1][2]).sum(axis=-1)) == 12
    assert np.abs(want[-1][1]).max() > 0.1


def test_q8layer_with_weights_fed_at_run_time_matches_packed_weights(kernel_library):
    constant = one_node()
    fed, weights = weights_fed_at_run_time(constant)
    assert len(weights) == 8
    want = steps(session(constant, kernel_library, 2))
    got = steps(session(fed, kernel_library, 2), weights)
    for w, g in zip(want, got):
        for a, b in zip(w, g):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-3 * max(np.abs(a).max(), 1.0))


def test_q8layer_names_the_bad_width_and_the_full_cache(kernel_library):
    sess = session(one_node(three_nodes(x_width="h")), kernel_library)
    cache = np.zeros((1, KV_HEADS, CAPACITY, D), np.float32)
    feed = {"x": np.ones((1, 2, 32), np.float32), "residual": np.ones((1, 2, HIDDEN), np.float32),
            "past_key": cache, "past_value": cache, "seqlens_k": np.array([1], np.int32)}
    with pytest.raises(Exception, match=r"Q8Layer node 'attn/q8layer': input x has shape \[1, 2, 32\]; it must be "
                                        r"\[batch, sequence, hidden = 64\]"):
        sess.run(None, feed)
    feed |= {"x": np.ones((1, 2, HIDDEN), np.float32), "seqlens_k": np.array([CAPACITY], np.int32)}
    with pytest.raises(Exception, match=r"Q8Layer node 'attn/q8layer': sequence 0 has total length 25 for 2 new "
                                        r"tokens; it must be at least that and at most the cache \(24\)"):
        sess.run(None, feed)


def test_a_layer_whose_attention_output_is_read_elsewhere_is_left_alone():
    model = three_nodes()
    model.graph.output.append(helper.make_tensor_value_info("qkv.y", TensorProto.FLOAT, None))
    assert fuse_layer_nodes(model.graph) == 0
    assert [n.op_type for n in model.graph.node] == ["MatMulQ8", "CachedAttention", "Q8Mlp"]


def test_a_decode_step_as_one_region_gives_the_same_bits_however_its_work_is_cut(kernel_library, tmp_path):
    """A decode step's layer runs as one parallel region whose phases threads claim unit by unit (LayerStep in
    ort_op.cc). Settings are read once per process, so each runs in a child: the region with one unit per CPU and
    with 8 (more units than threads, claimed as they finish), the matmul-at-a-time path, and the weight stream's
    prefetch off and far past every matrix's end, must give the same bits as the three nodes; a full cache fails at the decode step before anything is written."""
    import os
    import subprocess
    import textwrap

    script = textwrap.dedent("""
        import sys, numpy as np
        sys.path.insert(0, sys.argv[1])
        import test_kernel_layer_node as t
        sess = t.session(t.one_node(), sys.argv[2], 2)
        np.save(sys.argv[3], np.concatenate([a.reshape(-1) for step in t.steps(sess) for a in step]))
        cache = np.zeros((1, t.KV_HEADS, t.CAPACITY, t.D), np.float32)
        feed = {"x": np.ones((1, 1, t.HIDDEN), np.float32), "residual": np.ones((1, 1, t.HIDDEN), np.float32),
                "past_key": cache, "past_value": cache, "seqlens_k": np.array([t.CAPACITY], np.int32)}
        try:
            sess.run(None, feed)
        except Exception as e:
            print(e)
        assert not cache.any()
    """)
    want = np.concatenate([a.reshape(-1) for step in steps(session(three_nodes(), kernel_library, 2)) for a in step])
    for region, tasks, prefetch in (("1", "1", "4352"), ("1", "8", "4352"), ("0", "1", "4352"), ("1", "1", "0"),
                                    ("1", "1", "1000000")):
        out = tmp_path / f"layer-{region}-{tasks}-{prefetch}.npy"
        env = {**os.environ, "EDGELLM_KERNEL_LAYER_REGION": region, "EDGELLM_KERNEL_TASKS_PER_CPU": tasks,
               "EDGELLM_KERNEL_PREFETCH": prefetch}
        done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(kernel_library), str(out)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        np.testing.assert_array_equal(np.load(out), want, err_msg=f"region {region}, {tasks} units a CPU, prefetch {prefetch}")
        assert "sequence 0 has total length 25 for 1 new tokens; it must be at least that and at most the cache " \
               "(24)" in done.stdout, done.stdout
