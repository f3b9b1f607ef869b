"""4-bit blocks with a float minimum (GGUF's Q4_1 layout): edgellm.convert.q4_blocks and ai.edgellm.MatMulQ8 bits=4.

The kernel is compared with the float matmul it stands for, with the activations rounded to int16 per 32-block as
the kernel rounds them: that comparison is tight (float summation order only), so a wrong nibble order, a lost
minimum or a misplaced block scale fails it. Weights fed at run time take the scalar reference path; constant ones
the packed AVX-512 path where the CPU has it: both must give the same answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.convert.q4_blocks import Q4Blocks, dequantize, from_weights
from edgellm.errors import ModelFormatError

from .test_kernels import X86_LINUX, library, session  # noqa: F401  (library: a fixture)

onnx = pytest.importorskip("onnx", reason="onnx (the [convert] extra) builds the test graphs")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, RuntimeException  # noqa: E402

SHAPES = [(64, 48), (96, 40), (576, 960), (1536, 576)]  # K/32 odd and N % 16 != 0 pad pairs and tiles


def q4_source(K: int, N: int, seed: int = 0) -> np.ndarray:
    """fp32 weights [N, K] exactly on Q4_1 grids, as a GGUF reader gives them: d * q + m with fp16 d and m, each
    block's q spanning 0..15 (llama.cpp's quantizer puts the minimum at 0 and the maximum at 15)."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(N, K // 32, 32)).astype(np.float32)
    q[..., 0], q[..., 31] = 0, 15
    d = (rng.random((N, K // 32, 1)) * 0.01 + 1e-3).astype(np.float16).astype(np.float32)
    m = (-rng.random((N, K // 32, 1)) * 0.08).astype(np.float16).astype(np.float32)
    return (d * q + m).reshape(N, K)


def q4_model(K: int, N: int, blocks: Q4Blocks, *, constant: bool = True, bits: int = 4) -> bytes:
    node = helper.make_node("MatMulQ8", ["A", "B", "scales"], ["Y"], name="proj", domain="ai.edgellm", K=K, N=N,
                            bits=bits, block_size=32)
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", K])]
    initializers = [numpy_helper.from_array(blocks.nibbles, "B"), numpy_helper.from_array(blocks.dm, "scales")]
    if not constant:
        inputs += [helper.make_tensor_value_info("B", TensorProto.UINT8, ["n", "blocks", "half"]),
                   helper.make_tensor_value_info("scales", TensorProto.FLOAT16, ["n", "blocks", "two"])]
        initializers = []
    graph = helper.make_graph([node], "q4", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.edgellm", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def int16_activations(A: np.ndarray) -> np.ndarray:
    """A as the kernel sees it: per 32-block, rounded to int16 steps of the block's |max| / 32767."""
    M, K = A.shape
    blocks = A.reshape(M, K // 32, 32).astype(np.float64)
    step = np.abs(blocks).max(-1, keepdims=True) / 32767
    return (np.rint(blocks / np.where(step > 0, step, 1)) * step).reshape(M, K)


def test_recovers_q4_1_blocks_bit_for_bit():
    W = q4_source(96, 40, seed=1)
    blocks = from_weights(W)
    assert blocks.exact == 1.0 and blocks.nibbles.shape == (40, 3, 16) and blocks.dm.dtype == np.float16
    assert np.array_equal(dequantize(blocks), W)
    low = blocks.nibbles & 0x0F
    assert np.array_equal(low[..., 0], np.zeros((40, 3))), "the minimum is weight 0's q (low nibble of byte 0)"


def test_other_weights_round_to_nearest_within_half_a_step():
    W = np.random.default_rng(2).standard_normal((24, 64)).astype(np.float32)
    blocks = from_weights(W)
    assert blocks.exact == 0.0
    step = blocks.dm[..., 0].astype(np.float32).repeat(32, axis=1)
    assert (np.abs(dequantize(blocks) - W) <= 0.5 * step + 1e-6).all()


def test_block_values_float16_cannot_hold_fail_with_the_value():
    W = np.full((2, 32), 1e6, np.float32)
    with pytest.raises(ModelFormatError, match=r"minimum 1000000\.0 does not fit float16"):
        from_weights(W)
    with pytest.raises(ModelFormatError, match=r"K=40 cannot be cut into 4-bit blocks of 32"):
        from_weights(np.zeros((2, 40), np.float32))


pytestmark_kernel = pytest.mark.skipif(not X86_LINUX, reason="edgellm's kernels are built for x86-64 Linux only")


@pytestmark_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 9, 38])  # decode, verify passes, prompts (row groups of 8 / 4)
def test_matches_the_float_matmul(library, M, K, N, threads):
    W = q4_source(K, N, seed=K + N)
    y = session(q4_model(K, N, from_weights(W)), threads, with_library=True)
    A = np.random.default_rng(M).standard_normal((M, K), dtype=np.float32)
    A[:, : K // 2] *= 4.0  # blocks of different magnitudes: a wrong per-block activation scale shows
    got = y.run(None, {"A": A})[0]
    exact = int16_activations(A) @ W.T.astype(np.float64)
    peak = float(np.abs(exact).max())
    assert got.shape == (M, N) and got.dtype == np.float32
    assert np.abs(got - exact).max() <= 2e-5 * peak, f"vs the same float sum: {np.abs(got - exact).max()} of {peak}"
    plain = A.astype(np.float64) @ W.T.astype(np.float64)  # 16-bit activations: within float rounding of it
    assert np.abs(got - plain).max() <= 1e-4 * peak, f"vs the float matmul: {np.abs(got - plain).max()} of {peak}"


@pytestmark_kernel
def test_weights_fed_at_run_time_match_packed_ones(library):
    K, N = 96, 40
    blocks = from_weights(q4_source(K, N, seed=5))
    A = np.random.default_rng(6).standard_normal((5, K), dtype=np.float32)
    packed = session(q4_model(K, N, blocks), 2, True).run(None, {"A": A})[0]
    fed = session(q4_model(K, N, blocks, constant=False), 2, True)
    got = fed.run(None, {"A": A, "B": blocks.nibbles, "scales": blocks.dm})[0]
    assert np.abs(got - packed).max() <= 1e-5 * np.abs(packed).max()
    with pytest.raises(InvalidArgument, match=r"input scales has shape \[40, 3, 1\].*at the call; for 4-bit weights "
                                              r"it must be float16 with N\*K/16 = 240 elements"):
        fed.run(None, {"A": A, "B": blocks.nibbles, "scales": blocks.dm[..., :1].copy()})


@pytestmark_kernel
def test_a_width_that_disagrees_with_bits_fails_at_load(library):
    blocks = from_weights(q4_source(64, 48))
    with pytest.raises(RuntimeException, match=r"MatMulQ8 node 'proj': input B has shape \[48, 2, 16\].*at load; it "
                                               r"must be uint8 with N\*K = 3072 elements"):
        session(q4_model(64, 48, blocks, bits=8), 1, with_library=True)


@pytestmark_kernel
@pytest.mark.parametrize("forced", ["avx2", "scalar"])
def test_the_plain_c_path_matches_where_the_cpu_has_no_vnni(library, forced):
    """EDGELLM_Q8_ISA lowers the code path (read once per process): the 4-bit weights then stay unpacked and run the
    plain-C kernel with plain-C 16-bit activations, and still give the float matmul's answer."""
    import os
    import subprocess
    import sys
    import textwrap

    from edgellm import kernels

    script = textwrap.dedent("""
        import sys, numpy as np
        import tests.test_kernel_q4 as t
        from edgellm.convert.q4_blocks import from_weights
        for K, N in t.SHAPES[:3]:
            W = t.q4_source(K, N, seed=9)
            A = np.random.default_rng(2).standard_normal((3, K), dtype=np.float32)
            got = t.session(t.q4_model(K, N, from_weights(W)), 2, True).run(None, {"A": A})[0]
            exact = t.int16_activations(A) @ W.T.astype(np.float64)
            err, peak = float(np.abs(got - exact).max()), float(np.abs(exact).max())
            assert err <= 2e-5 * peak, (K, N, err, peak)
        print("ok")
    """)
    env = {**os.environ, "EDGELLM_Q8_ISA": forced}
    env.pop(kernels.ENV, None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
