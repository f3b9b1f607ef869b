"""The GPU graph (edgellm convert --target cuda), checked where it can be without a GPU: on the CPU provider.

onnxruntime's CPU provider runs fp16 GroupQueryAttention and fp16-input MatMulNBits, so the GPU graph's
numerics, its fp16 KV buffers and the bad-input paths are tested on every machine; tests/gpu/ holds what
needs the device itself.
"""

import logging
import subprocess
import sys

import numpy as np
import onnx
import pytest

import edgellm
from edgellm.contract import GraphOptions
from edgellm.errors import InvalidParameterError, ModelFormatError, ProviderError
from edgellm.manifest import read_manifest, verify_checksums
from edgellm.runtime.session import DecoderSession, resolve_providers
from tests.conftest import app_stderr_lines, cuda_available

PROMPTS = ["The garden in spring", "Once upon a time", "Water boils at", "My favourite food is", "Tell me about"]
CPU_ONLY = pytest.mark.skipif(cuda_available(), reason="describes a CPU-only onnxruntime; tests/gpu/ covers this one")
NEAR_TIE = 0.1  # top-2 logit margin of the reference below which fp16 rounding (max |diff| ~0.04 here) may flip


def greedy_divergence(reference, candidate, prompt, steps: int = 24) -> tuple[int, float] | None:
    """Greedy-decode `reference`; feed `candidate` the same tokens. None when every step's argmax agrees,
    else (step, reference's top-2 margin there) of the first disagreement, after checking that the candidate
    picked the reference's runner-up (a flipped near-tie, not a different distribution)."""
    ids = reference.encode(prompt)
    reference.session.truncate(0)
    candidate.session.truncate(0)
    ref = reference.session.forward(ids, keep=1)[0].copy()
    cand = candidate.session.forward(ids, keep=1)[0].copy()
    for step in range(steps):
        token = int(ref.argmax())
        if int(cand.argmax()) != token:
            runner_up, best = np.sort(ref)[-2:]
            assert int(cand.argmax()) == int(np.argsort(ref)[-2]), f"{prompt!r} step {step}: not the runner-up"
            return step, float(best - runner_up)
        ref = reference.session.forward([token], keep=1)[0].copy()
        cand = candidate.session.forward([token], keep=1)[0].copy()
    return None


def assert_same_greedy_tokens(reference, candidate, prompts: list) -> None:
    """Tokens equal, or diverging only at a near-tie of the reference; most prompts must match outright."""
    outcomes = {str(p): greedy_divergence(reference, candidate, p) for p in prompts}
    ties = {p: o for p, o in outcomes.items() if o is not None}
    assert all(margin < NEAR_TIE for _, margin in ties.values()), ties
    assert len(ties) <= len(prompts) // 2, ties


def test_gpu_graph_is_fp16_with_int8_weights(tiny_cuda_dir):
    m = read_manifest(tiny_cuda_dir)
    assert m.graph.target == "cuda" and m.graph.kv_dtype == "float16" and m.precision == "int8"
    assert m.quantization["bits"] == 8 and m.quantization["accuracy_level"] == 4
    assert m.quantization["activations"] == "float16" and m.quantization["smoothing"] is None
    model = onnx.load(str(tiny_cuda_dir / "model.onnx"), load_external_data=False)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)}
    assert types["past_key_values.0.key"] == onnx.TensorProto.FLOAT16
    assert types["present.1.value"] == onnx.TensorProto.FLOAT16
    assert types["logits"] == onnx.TensorProto.FLOAT  # cast on the device; the host samples fp32
    ops = [n.op_type for n in model.graph.node]
    assert "MatMul" not in ops, "every projection should be int8 MatMulNBits (CUDA has 8-bit kernels)"
    assert ops.count("MatMulNBits") == 4 * 2 + 1  # qkv, o, gate_up, down per layer; lm_head and "GatherBlockQuantized" in ops
    assert all(a.i == 8 for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits")
    scales = {t.name: t.data_type for t in model.graph.initializer}
    assert scales["embed/scales"] == onnx.TensorProto.FLOAT16 and scales["cos_cache"] == onnx.TensorProto.FLOAT16
    v = m.validation
    assert v.candidate == "int8" and v.target == "cuda" and v.provider == "CPUExecutionProvider"
    assert v.perplexity_ratio < 1.01 and v.kv_consistency["int8"].argmax_match == 1.0
    verify_checksums(tiny_cuda_dir, m)


def test_gpu_graph_greedy_tokens_equal_fp32(tiny_cuda_dir, tiny_fp32_dir):
    """On the CPU provider the GPU graph (fp16 activations + cache, int8 weights) decodes the fp32 graph's tokens."""
    gpu = edgellm.load(tiny_cuda_dir, providers="cpu")
    reference = edgellm.load(tiny_fp32_dir)
    assert gpu.session.kv_dtype is np.float16 and reference.session.kv_dtype is np.float32
    assert gpu.session._kv[0].data_type() == "tensor(float16)"
    assert_same_greedy_tokens(reference, gpu, PROMPTS)


@CPU_ONLY
def test_gpu_folder_on_cpu_only_install_warns_once(tiny_cuda_dir):
    """No GPU here: the folder still runs (on the CPU), with exactly one warning line that says the fix."""
    done = subprocess.run([sys.executable, "-m", "edgellm.cli", "generate", "-m", str(tiny_cuda_dir), "--raw",
                           "--max-new-tokens", "4", "Once upon"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = app_stderr_lines(done.stderr)
    assert len(lines) == 1, lines
    assert "converted for NVIDIA GPUs" in lines[0] and "CPUExecutionProvider" in lines[0]
    assert "onnxruntime-gpu" in lines[0] and "--target cpu" in lines[0]
    assert done.stdout.strip()


def test_cpu_folder_loads_without_warning(tiny_fp32_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        edgellm.load(tiny_fp32_dir)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@CPU_ONLY
def test_cuda_without_gpu_build_names_the_fix(tiny_cuda_dir):
    with pytest.raises(ProviderError, match="pip install onnxruntime-gpu") as info:
        edgellm.load(tiny_cuda_dir, providers="cuda")
    assert "'cuda'" in str(info.value) and "CPUExecutionProvider" in str(info.value)
    with pytest.raises(ProviderError, match="JetPack"):
        resolve_providers("tensorrt")


def test_manifest_kv_dtype_must_match_the_graph(tiny_cuda_dir):
    m = read_manifest(tiny_cuda_dir)
    with pytest.raises(ModelFormatError, match="manifest says the KV cache is float32, the graph takes float16"):
        DecoderSession(tiny_cuda_dir / "model.onnx", m.io, m.dims, 64, graph=GraphOptions())  # a CPU graph's
    with pytest.raises(ModelFormatError, match="graph.target='gpu' is invalid: it must be one of cpu, cuda"):
        GraphOptions.from_dict({"target": "gpu"})


@pytest.mark.parametrize("args, message", [
    (["--target", "cuda", "--precision", "fp32"],
     "precision fp32 cannot be built for target cuda (onnxruntime's CUDA GroupQueryAttention has fp16 kernels "
     "only). Fix: use --precision int8 or fp16 with --target cuda, or --target cpu for fp32."),
    (["--precision", "fp16"], "precision fp16 cannot be built for target cpu"),
    (["--target", "cuda", "--batch-invariant"], "--batch-invariant is built and measured for the CPU graph only"),
])
def test_convert_refuses_what_the_target_cannot_honour(tiny_hf_dir, tmp_path, args, message):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "edgellm.cli", "convert", str(tiny_hf_dir), "-o", str(out), *args],
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and message in done.stderr and len(done.stderr.splitlines()) == 1
    assert not out.exists() and not list(tmp_path.iterdir())  # refused before any work: no staging folder either


def test_convert_options_check_the_target():
    from edgellm.convert.pipeline import ConvertOptions

    with pytest.raises(InvalidParameterError, match="target='gpu' is not one of cpu, cuda"):
        ConvertOptions(target="gpu")
    assert ConvertOptions(target="cuda", precision="fp16").target == "cuda"


def test_dense_fp16_gpu_graph(tiny_hf_dir, tiny_fp32_dir, tmp_path):
    """--precision fp16 --target cuda: dense fp16 weights (e.g. for TensorRT, which has no MatMulNBits)."""
    from edgellm.convert.pipeline import ConvertOptions, convert
    from edgellm.convert.validate import ValidationSettings

    settings = ValidationSettings(heldout_tokens=256, window=128, consistency_tokens=24)
    result = convert(str(tiny_hf_dir), tmp_path / "fp16", ConvertOptions(
        precision="fp16", target="cuda", progress=False, validation=settings))
    v = result.manifest.validation
    assert v.candidate == "fp16" and v.perplexity_ratio < 1.002 and v.gate.passed
    assert v.kv_consistency["fp16"].max_abs_diff_stepwise < 0.05
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fp16" / "model.onnx"), load_external_data=False).graph.node}
    assert "MatMulNBits" not in ops and "MatMul" in ops
    gpu, reference = edgellm.load(tmp_path / "fp16"), edgellm.load(tiny_fp32_dir)
    assert_same_greedy_tokens(reference, gpu, PROMPTS)
