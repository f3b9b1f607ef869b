"""On an NVIDIA GPU (onnxruntime-gpu): the GPU graph runs on CUDA/TensorRT with its cache on the device.

Skipped, with the reason, where onnxruntime has no CUDA provider (tests/conftest.py); scripts/gpu_check.sh
runs them with EDGELLM_REQUIRE_GPU=1 (a missing GPU fails) and EDGELLM_GPU_MODEL set to the default model
converted --target cuda. Without EDGELLM_GPU_MODEL they use the tiny model converted --target cuda.
"""

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import edgellm
from edgellm.manifest import read_manifest, verify_checksums
from tests.runtime.test_gpu_target import PROMPTS, assert_same_greedy_tokens

pytestmark = pytest.mark.gpu

# CPU vs CUDA kernels for the same fp16 graph: other summation orders, fp16 accumulation in places.
CPU_VS_CUDA_NEAR_TIE = 0.25


@pytest.fixture(scope="module")
def gpu_model_dir(request) -> Path:
    folder = os.environ.get("EDGELLM_GPU_MODEL")
    if folder:
        return Path(folder)
    return request.getfixturevalue("tiny_cuda_dir")


def test_kv_cache_and_binding_live_on_the_device(gpu_model_dir):
    llm = edgellm.load(gpu_model_dir, providers="cuda")
    session = llm.session
    assert llm.provider == "CUDAExecutionProvider" and session.device == "cuda"
    assert session.kv_dtype is np.float16
    pointers = [kv.data_ptr() for kv in session._kv]
    assert all(kv.device_name().lower() == "cuda" and kv.data_type() == "tensor(float16)" for kv in session._kv)
    result = llm.generate("The capital of France is", edgellm.SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert len(result.token_ids) == 8
    outputs = session._binding.get_outputs()
    logits, presents = outputs[0], outputs[1:]
    # Only the last position's logits come back to the host...
    assert logits.device_name().lower() == "cpu" and logits.shape() == [1, 1, session.vocab_size]
    # ...while every present.* output is the very device buffer bound as past.*: written in place, never copied.
    assert len(presents) == len(pointers)
    assert [p.data_ptr() for p in presents] == pointers
    assert all(p.device_name().lower() == "cuda" for p in presents)


def test_gpu_tokens_equal_the_cpu_run_of_the_same_folder(gpu_model_dir):
    import tests.runtime.test_gpu_target as cpu_checks

    on_cpu = edgellm.load(gpu_model_dir, providers="cpu")
    on_gpu = edgellm.load(gpu_model_dir, providers="cuda")
    previous, cpu_checks.NEAR_TIE = cpu_checks.NEAR_TIE, CPU_VS_CUDA_NEAR_TIE
    try:
        assert_same_greedy_tokens(on_cpu, on_gpu, PROMPTS)
    finally:
        cpu_checks.NEAR_TIE = previous


def test_gpu_folder_prefers_cuda_without_warning(gpu_model_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        llm = edgellm.load(gpu_model_dir)
    assert llm.provider == "CUDAExecutionProvider"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_cpu_folder_on_cuda_warns_once(tiny_int8_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        llm = edgellm.load(tiny_int8_dir, providers="cuda")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert llm.provider == "CUDAExecutionProvider"
    assert len(warnings) == 1 and "--target cuda" in warnings[0]


def test_tensorrt_builds_and_reuses_its_engine_cache(gpu_model_dir, tmp_path, caplog):
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime-gpu has no TensorRT provider (pip install tensorrt, or JetPack's TensorRT)")
    folder = tmp_path / "model"
    shutil.copytree(gpu_model_dir, folder)
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        llm = edgellm.load(folder, providers="tensorrt")
    assert llm.session.providers[:2] == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    assert any("first run takes minutes" in r.getMessage() for r in caplog.records)
    first = llm.generate("Once upon a time", edgellm.SamplingParams(max_new_tokens=8, ignore_eos=True))
    engines = list((folder / ".cache" / "trt").glob("*.engine"))
    assert engines, "TensorRT wrote no engine into MODEL/.cache/trt"
    verify_checksums(folder, read_manifest(folder))  # the cache is not part of the model
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgellm"):
        again = edgellm.load(folder, providers="tensorrt")
    assert not any("first run takes minutes" in r.getMessage() for r in caplog.records)
    second = again.generate("Once upon a time", edgellm.SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert second.token_ids == first.token_ids
