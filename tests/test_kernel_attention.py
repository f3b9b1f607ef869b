"""ai.edgellm.CachedAttention against onnxruntime's GroupQueryAttention, step by step through a KV cache.

Both ops get the same packed qkv, cache buffers, seqlens_k and rotary tables, for a prompt, then single decode
steps, then a 3-token continuation (speculative verify / incremental prefill), with a cache bound in place
(IO binding: past and present are one buffer, as edgellm's DecoderSession runs it) and without. Head size 64
runs the AVX-512 path, 32 the plain C one.
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

H, HKV, CAPACITY, POSITIONS = 6, 2, 40, 48


def rotary_tables(D: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000 ** (np.arange(0, D, 2, dtype=np.float64) / D))
    angles = np.outer(np.arange(POSITIONS), inv)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def graph(ours: bool, D: int) -> bytes:
    cos, sin = rotary_tables(D)
    cache = ["b", HKV, CAPACITY, D]
    inputs = [helper.make_tensor_value_info("qkv", TensorProto.FLOAT, ["b", "s", (H + 2 * HKV) * D]),
              helper.make_tensor_value_info("past_key", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("past_value", TensorProto.FLOAT, cache),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["b"]),
              helper.make_tensor_value_info("total", TensorProto.INT32, [])]
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("out", "present_key", "present_value")]
    if ours:
        node = helper.make_node("CachedAttention", ["qkv", "past_key", "past_value", "seqlens_k", "cos", "sin"],
                                ["out", "present_key", "present_value"], domain="ai.edgellm", name="attn",
                                num_heads=H, kv_num_heads=HKV, scale=float(D ** -0.5))
        inputs = inputs[:4]
    else:
        node = helper.make_node("GroupQueryAttention", ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total",
                                                        "cos", "sin"], ["out", "present_key", "present_value"],
                                domain="com.microsoft", name="attn", num_heads=H, kv_num_heads=HKV, do_rotary=1,
                                rotary_interleaved=0, local_window_size=-1, scale=float(D ** -0.5))
    model = helper.make_graph([node], "attention", inputs, outputs,
                              initializer=[numpy_helper.from_array(cos, "cos"), numpy_helper.from_array(sin, "sin")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.edgellm", 1), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(model, opset_imports=opsets, ir_version=8).SerializeToString()


class Runner:
    """One op through a sequence of calls; in_place binds one cache buffer as both past and present."""

    def __init__(self, ours: bool, D: int, library, in_place: bool, threads: int = 2):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.register_custom_ops_library(str(library))
        self.session = ort.InferenceSession(graph(ours, D), options, providers=["CPUExecutionProvider"])
        self.ours, self.in_place = ours, in_place
        self.keys = np.zeros((1, HKV, CAPACITY, D), np.float32)
        self.values = np.zeros_like(self.keys)
        self.total = 0

    def step(self, qkv: np.ndarray) -> np.ndarray:
        self.total += qkv.shape[1]
        feed = {"qkv": qkv, "seqlens_k": np.array([self.total - 1], np.int32)}
        if not self.ours:
            feed["total"] = np.array(self.total, np.int32)
        if not self.in_place:
            out, self.keys, self.values = self.session.run(None, {**feed, "past_key": self.keys, "past_value": self.values})
            return out
        binding = self.session.io_binding()
        k, v = ort.OrtValue.ortvalue_from_numpy(self.keys), ort.OrtValue.ortvalue_from_numpy(self.values)
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_ortvalue_input("past_key", k)
        binding.bind_ortvalue_input("past_value", v)
        binding.bind_output("out")
        binding.bind_ortvalue_output("present_key", k)
        binding.bind_ortvalue_output("present_value", v)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


@pytest.mark.parametrize("D", [64, 32])
@pytest.mark.parametrize("in_place", [True, False])
def test_cached_attention_matches_group_query_attention(kernel_library, D, in_place):
    rng = np.random.default_rng(D)
    ours, theirs = Runner(True, D, kernel_library, in_place), Runner(False, D, kernel_library, in_place)
    for tokens in (19, 1, 1, 3, 1):  # past 16 keys: the 16-at-a-time path and its tail
        qkv = rng.standard_normal((1, tokens, (H + 2 * HKV) * D)).astype(np.float32)
        got, want = ours.step(qkv), theirs.step(qkv)
        assert got.shape == want.shape == (1, tokens, H * D)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        filled = ours.total
        np.testing.assert_allclose(ours.keys[:, :, :filled], theirs.keys[:, :, :filled], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ours.values[:, :, :filled], theirs.values[:, :, :filled], rtol=1e-6, atol=0)
        if in_place:  # the new entries landed in the bound buffer itself
            assert np.abs(ours.keys[:, :, filled - tokens:filled]).max() > 0


def test_a_full_cache_is_a_clear_error(kernel_library):
    runner = Runner(True, 64, kernel_library, in_place=False)
    runner.total = CAPACITY  # the next token would be past the cache
    with pytest.raises(Exception, match=r"CachedAttention node 'attn': sequence 0 has total length 41.*cache \(40\)"):
        runner.step(np.zeros((1, 1, (H + 2 * HKV) * 64), np.float32))


def test_decode_heads_on_the_pool_give_the_same_bits(kernel_library, tmp_path):
    """Past EDGELLM_ATTENTION_PARALLEL_FROM positions a decode step hands its heads to the intra-op pool (read once
    per process, so set in a child): the same bits as one thread doing them all, and GroupQueryAttention's answer."""
    import os
    import subprocess
    import textwrap

    script = textwrap.dedent("""
        import sys, numpy as np
        sys.path.insert(0, sys.argv[1])
        import test_kernel_attention as t
        rng = np.random.default_rng(3)
        ours = t.Runner(True, 64, sys.argv[2], in_place=True)
        theirs = t.Runner(False, 64, sys.argv[2], in_place=True)
        outs = []
        for tokens in (9, 1, 1, 1, 2, 1):
            qkv = rng.standard_normal((1, tokens, (t.H + 2 * t.HKV) * 64)).astype(np.float32)
            got, want = ours.step(qkv), theirs.step(qkv)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            outs.append(got)
        np.save(sys.argv[3], np.concatenate([o.reshape(-1) for o in outs]))
    """)
    results = {}
    for parallel_from in ("0", "100000"):  # every decode step on the pool; never
        out = tmp_path / f"attention-{parallel_from}.npy"
        env = {**os.environ, "EDGELLM_ATTENTION_PARALLEL_FROM": parallel_from}
        done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), str(kernel_library), str(out)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        results[parallel_from] = np.load(out)
    np.testing.assert_array_equal(results["0"], results["100000"])
