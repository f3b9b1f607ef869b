"""edgellm's custom op library (edgellm.kernels): ai.edgellm.MatMulQ8 against onnxruntime's MatMulNBits.

Each case builds a one-node graph with onnx.helper for both ops on the same random weights and runs both in real
onnxruntime, at 1 and 2 intra-op threads. CI builds the library (scripts/setup.sh); a missing library FAILS
here on x86-64 Linux (build it: python -m edgellm.kernels build) and is skipped, with the reason, elsewhere.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgellm import kernels

X86_LINUX = platform.machine().lower() in {"x86_64", "amd64"} and sys.platform.startswith("linux")
pytestmark = pytest.mark.skipif(not X86_LINUX, reason=f"edgellm's kernels are built for x86-64 Linux only, "
                                                      f"this is {sys.platform} {platform.machine()}")

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx", reason="onnx (the [convert] extra) builds the test graphs")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument, RuntimeException  # noqa: E402

# (K, N): tiny ones (K/32 odd and N not a multiple of 16 pad the packed layout's pairs and tiles), then
# SmolLM2-135M's qkv and down projections
SHAPES = [(64, 48), (96, 40), (576, 960), (1536, 576)]


@pytest.fixture(scope="module")
def library(request):
    os.environ.pop(kernels.ENV, None)
    path = kernels.library_path()
    if path is None:
        pytest.fail(f"{kernels.default_library()} is not built or does not load; CI builds it in scripts/setup.sh. "
                    "Fix: python -m edgellm.kernels build")
    return path


def weights(K: int, N: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    B = rng.integers(0, 256, size=(N, K // 32, 32), dtype=np.uint8)
    # fp16-exact values: MatMulQ8 takes the scales as float16, MatMulNBits as float; both then see the same numbers
    scales = (rng.random(N * K // 32, dtype=np.float32) * 0.02 + 0.001).astype(np.float16).astype(np.float32)
    return B, scales


def model(op: str, K: int, N: int, B: np.ndarray, scales: np.ndarray, *, rank: int = 2, constant: bool = True,
          width: int | str | None = None, **attrs) -> bytes:
    """A one-node graph Y = op(A, B, scales). constant=False feeds B and scales as graph inputs; width: A's
    declared last dimension (default K; a name lets any width reach the op)."""
    domain = "ai.edgellm" if op == "MatMulQ8" else "com.microsoft"
    values = {"K": K, "N": N, "bits": 8, "block_size": 32} | attrs
    if op == "MatMulNBits":
        values.setdefault("accuracy_level", 4)
    values = {key: value for key, value in values.items() if value is not None}  # None: leave the attribute out
    node = helper.make_node(op, ["A", "B", "scales"], ["Y"], name="proj", domain=domain, **values)
    lead = [f"d{i}" for i in range(rank - 1)]
    inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, lead + [K if width is None else width])]
    scale_type = TensorProto.FLOAT16 if op == "MatMulQ8" else TensorProto.FLOAT
    scales = scales.astype(np.float16) if op == "MatMulQ8" else scales
    initializers = [numpy_helper.from_array(B, "B"), numpy_helper.from_array(scales, "scales")]
    if not constant:
        inputs += [helper.make_tensor_value_info("B", TensorProto.UINT8, ["n", "blocks", "block"]),
                   helper.make_tensor_value_info("scales", scale_type, ["n_blocks"])]
        initializers = []
    graph = helper.make_graph([node], op, inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                              initializer=initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def session(graph: bytes, threads: int, with_library: bool) -> "ort.InferenceSession":
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if with_library:
        assert kernels.register(options), "kernels.register() refused a library that library_path() returned"
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


def reference(A: np.ndarray, B: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The float matmul MatMulNBits stands for: W[n, k] = (B[n, k] - 128) * scales[n, k // 32]."""
    N, blocks, _ = B.shape
    W = (B.astype(np.float32) - 128.0) * scales.reshape(N, blocks, 1)
    return A.astype(np.float64) @ W.reshape(N, -1).T.astype(np.float64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 2, 5, 9, 38])  # decode, verify passes, prompts (row groups of 8 and what is left)
def test_matches_matmulnbits(library, M, K, N, threads):
    B, scales = weights(K, N, seed=K + N)
    ours = session(model("MatMulQ8", K, N, B, scales), threads, with_library=True)
    theirs = session(model("MatMulNBits", K, N, B, scales), threads, with_library=False)
    A = np.random.default_rng(M).standard_normal((M, K), dtype=np.float32)
    A[:, : K // 2] *= 4.0  # blocks of different magnitudes: a wrong per-block activation scale shows
    y = ours.run(None, {"A": A})[0]
    y_ort = theirs.run(None, {"A": A})[0]
    y_ref = reference(A, B, scales)
    assert y.shape == (M, N) and y.dtype == np.float32
    peak = float(np.abs(y_ref).max())
    assert np.abs(y - y_ort).max() <= 5e-3 * peak, f"MatMulQ8 vs MatMulNBits: {np.abs(y - y_ort).max()} of {peak}"
    assert np.abs(y - y_ref).max() <= 2e-2 * peak, f"MatMulQ8 vs float: {np.abs(y - y_ref).max()} of {peak}"


@pytest.mark.parametrize("M", [1, 3, 38])
def test_sixteen_bit_activations_match_the_float_matmul(library, M):
    """activation_bits=16: A at ~15 bits as two int8 rows, 64x finer than int8 (and its wrong sum fails here)."""
    K, N = 576, 960
    B, scales = weights(K, N, seed=11)
    A = np.random.default_rng(M).standard_normal((M, K), dtype=np.float32)
    A[:, : K // 2] *= 4.0
    fine = session(model("MatMulQ8", K, N, B, scales, activation_bits=16), 2, True).run(None, {"A": A})[0]
    coarse = session(model("MatMulQ8", K, N, B, scales), 2, True).run(None, {"A": A})[0]
    ref = reference(A, B, scales)
    peak = float(np.abs(ref).max())
    assert np.abs(fine - ref).max() <= 2e-4 * peak, f"{np.abs(fine - ref).max()} of {peak}"
    assert np.abs(fine - ref).max() * 20 < np.abs(coarse - ref).max()
    with pytest.raises(RuntimeException, match=r"activation_bits=12 is not supported \(8, or 16"):
        session(model("MatMulQ8", K, N, B, scales, activation_bits=12), 1, True)


def test_leading_dims_and_runtime_weights(library):
    """A of rank 3 keeps its leading dims; B and scales fed at run time are checked and used at the call."""
    K, N = 96, 80
    B, scales = weights(K, N, seed=7)
    sess = session(model("MatMulQ8", K, N, B, scales, rank=3, constant=False), 2, with_library=True)
    A = np.random.default_rng(1).standard_normal((2, 5, K), dtype=np.float32)
    y = sess.run(None, {"A": A, "B": B, "scales": scales.astype(np.float16)})[0]
    assert y.shape == (2, 5, N)
    ref = reference(A.reshape(-1, K), B, scales).reshape(2, 5, N)
    assert np.abs(y - ref).max() <= 2e-2 * np.abs(ref).max()
    one = A[:1, :1]  # a decode step: run-time weights take the row kernel, not the packed one
    y1 = sess.run(None, {"A": one, "B": B, "scales": scales.astype(np.float16)})[0]
    assert np.abs(y1 - ref[:1, :1]).max() <= 2e-2 * np.abs(ref).max()
    with pytest.raises(InvalidArgument, match=r"input B has shape \[80, 2, 16\].*N\*K = 7680"):
        sess.run(None, {"A": A, "B": B.reshape(N, 2, 48)[:, :, :16].copy(), "scales": scales.astype(np.float16)})
    empty = sess.run(None, {"A": np.zeros((0, 5, K), np.float32), "B": B, "scales": scales.astype(np.float16)})[0]
    assert empty.shape == (0, 5, N)


@pytest.mark.parametrize("attrs,message", [
    ({"block_size": 64}, r"block_size=64 is not supported \(only 32\)"),
    ({"bits": 2}, r"bits=2 is not supported \(only 8, or 4 with a minimum per block\)"),
    ({"bits": 4}, r"input B has shape \[48, 2, 32\].*at load; it must be uint8 with N\*K/2 = 1536 elements"),
    ({"block_size": None}, r"the int attribute 'block_size' is missing"),
])
def test_bad_attribute_fails_at_load(library, attrs, message):
    B, scales = weights(64, 48)
    with pytest.raises(RuntimeException, match=r"initialization: MatMulQ8 node 'proj': " + message):
        session(model("MatMulQ8", 64, 48, B, scales, **attrs), 1, with_library=True)


def test_wrong_weight_size_fails_at_load(library):
    B, scales = weights(64, 48)
    with pytest.raises(RuntimeException, match=r"initialization: MatMulQ8 node 'proj': input scales has shape \[47\] \(47 elements, type 10\) at load.*float16 with N\*K/32 = 96"):
        session(model("MatMulQ8", 64, 48, B, scales[:47]), 1, with_library=True)


def test_wrong_activation_width_fails_at_the_call(library):
    B, scales = weights(64, 48)
    sess = session(model("MatMulQ8", 64, 48, B, scales, width="k"), 1, with_library=True)
    with pytest.raises(InvalidArgument, match=r"MatMulQ8 node 'proj': input A has shape \[2, 32\]; its last dimension must be K = 64"):
        sess.run(None, {"A": np.ones((2, 32), np.float32)})


def test_env_turns_kernels_off(library, monkeypatch):
    monkeypatch.setenv(kernels.ENV, "0")
    assert kernels.library_path() is None
    assert kernels.register(ort.SessionOptions()) is False
    assert kernels.isa() == "unavailable"
    monkeypatch.delenv(kernels.ENV)
    assert kernels.library_path() == library


def test_isa_names_a_path(library):
    assert kernels.isa() in {"avx512vnni", "avx2", "scalar"}


@pytest.mark.parametrize("forced,tasks_per_cpu", [("avx2", "1"), ("scalar", "1"), ("", "16")])
def test_other_paths_match(library, forced, tasks_per_cpu):
    """EDGELLM_Q8_ISA lowers the code path and EDGELLM_KERNEL_TASKS_PER_CPU splits rows finer (both read once per
    process): each combination gives MatMulNBits' answer."""
    if forced == "avx2" and kernels.isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    script = textwrap.dedent("""
        import sys, numpy as np
        sys.path.insert(0, sys.argv[1])
        import test_kernels as t
        from edgellm import kernels
        assert sys.argv[2] in ("", kernels.isa()), kernels.isa()
        for K, N in t.SHAPES:
            B, scales = t.weights(K, N, seed=3)
            A = np.random.default_rng(5).standard_normal((3, K), dtype=np.float32)
            y = t.session(t.model("MatMulQ8", K, N, B, scales), 2, True).run(None, {"A": A})[0]
            y_ort = t.session(t.model("MatMulNBits", K, N, B, scales), 2, False).run(None, {"A": A})[0]
            err = float(np.abs(y - y_ort).max()); peak = float(np.abs(y_ort).max())
            assert err <= 5e-3 * peak, (K, N, err, peak)
        print("ok")
    """)
    env = {**os.environ, "EDGELLM_Q8_ISA": forced, "EDGELLM_KERNEL_TASKS_PER_CPU": tasks_per_cpu}
    env.pop(kernels.ENV, None)
    done = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), forced], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


@pytest.mark.parametrize("name,value,says", [
    ("EDGELLM_ATTENTION_PARALLEL_FROM", "lots", "a whole number >= 0"),
    ("EDGELLM_ATTENTION_PARALLEL_FROM", "-5", "a whole number >= 0"),
    ("EDGELLM_KERNEL_TASKS_PER_CPU", "0", "from 1 to 64"),
    ("EDGELLM_KERNEL_TASKS_PER_CPU", "2.5", "from 1 to 64"),
    ("EDGELLM_KERNEL_PREFETCH", "4k", "from 0 to 1048576"),
    ("EDGELLM_KERNEL_PREFETCH", "-64", "from 0 to 1048576"),
    ("EDGELLM_Q8_ISA", "avx512", "avx2, scalar"),
])
def test_a_kernel_setting_the_library_cannot_use_is_refused_at_load(monkeypatch, name, value, says):
    """The library would read these values as its default (or 0) without a word: register() refuses them."""
    import onnxruntime as ort

    from edgellm.errors import InvalidParameterError

    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(InvalidParameterError, match=f"{name}={value!r}.*{says}.*Fix: unset it"):
        kernels.register(ort.SessionOptions())
    monkeypatch.setenv(name, {"EDGELLM_Q8_ISA": "avx2"}.get(name, "3"))
    kernels.check_settings()  # a usable value passes


@pytest.mark.parametrize("value", [None, "0", "1000"])
def test_the_prefetch_distance_is_the_setting_or_the_cpu_makers_default(value):
    """Unset, the library prefetches 4352 bytes ahead on Intel CPUs and nothing on AMD's (measured slower there:
    simd_avx512.h); a set value is used as it is. Read once per process, so each case runs in its own."""
    if kernels.isa() != "avx512vnni":
        pytest.skip(f"the packed path (and with it the prefetch) runs on AVX-512 VNNI CPUs only; this one runs "
                    f"{kernels.isa()}")
    env = {k: v for k, v in os.environ.items() if k not in ("EDGELLM_KERNEL_PREFETCH", "EDGELLM_KERNEL_PACK",
                                                            kernels.ENV, "EDGELLM_Q8_ISA")}
    if value is not None:
        env["EDGELLM_KERNEL_PREFETCH"] = value
    done = subprocess.run([sys.executable, "-c", "from edgellm import kernels; print(kernels.prefetch_distance())"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    with open("/proc/cpuinfo") as info:
        amd = "AuthenticAMD" in info.read()
    want = int(value) if value is not None else (0 if amd else 4352)
    assert int(done.stdout.strip()) == want


def test_a_library_older_than_the_prefetch_export_asks_for_a_rebuild(monkeypatch):
    """A library built before edgellm_kernel_prefetch existed (sources updated, not rebuilt): one error naming the
    file and the fix, not an AttributeError. A real library without the symbol (libc) stands in for it."""
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    monkeypatch.delenv(kernels.ENV, raising=False)
    monkeypatch.setattr(kernels, "_open", lambda path: libc)
    with pytest.raises(kernels.BuildError,
                       match="predates edgellm_kernel_prefetch.*Fix: python -m edgellm.kernels build"):
        kernels.prefetch_distance()


def test_import_stays_light():
    """Importing edgellm.kernels loads neither torch nor the library (it is opened on first use)."""
    code = ("import sys, edgellm.kernels; print('torch' in sys.modules, "
            "'libedgellm_ortops' in open('/proc/self/maps').read())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


def test_build_command_writes_a_loadable_library(tmp_path):
    """python -m edgellm.kernels build --out: the library compiles here and registers with onnxruntime."""
    out = tmp_path / "libedgellm_ortops.so"
    done = subprocess.run([sys.executable, "-m", "edgellm.kernels", "build", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"edgellm kernels: built {out} in ")
    ort.SessionOptions().register_custom_ops_library(str(out))


def test_build_without_compiler_says_so_in_one_line(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path), "CXX": "", "CC": ""}
    done = subprocess.run([sys.executable, "-m", "edgellm.kernels", "build", "--out", str(tmp_path / "x.so")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: edgellm kernels not built: no C/C++ "
                                                                  "compiler found"), done.stderr
    assert "Fix: apt-get install g++" in done.stderr
    assert not (tmp_path / "x.so").exists()
