"""`edgellm bench --save`: measured figures travel with the model folder without breaking its checksums."""

import json
import shutil
import subprocess
import sys

import pytest

import edgellm
from edgellm.errors import ModelFormatError
from edgellm.manifest import BENCHMARKS_NAME, read_manifest, verify_checksums
from edgellm.runtime.benchmarks import DeviceBenchmark, save_benchmark
from edgellm.runtime.device import cpu_model
from tests.conftest import app_stderr_lines


def cli(*args):
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True)


@pytest.fixture()
def model_copy(tiny_int8_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_int8_dir, folder)
    return folder


def bench_save(folder, *extra):
    done = cli("bench", "-m", str(folder), "--runs", "2", "--warmup", "0", "--new-tokens", "4", "--save", *extra)
    assert done.returncode == 0, done.stderr
    return done


def test_bench_save_then_info_and_read_benchmarks(model_copy):
    assert edgellm.read_benchmarks(model_copy) == []
    done = bench_save(model_copy, "--threads", "1")
    assert f"saved to {model_copy / BENCHMARKS_NAME}" in done.stdout
    (entry,) = edgellm.read_benchmarks(model_copy)
    assert isinstance(entry, DeviceBenchmark)
    assert entry.provider == "CPUExecutionProvider" and entry.threads == 1 and entry.runs == 2
    assert entry.device == cpu_model() and entry.cpu_model == cpu_model() and entry.peak_device_memory_mb is None
    assert entry.ttft_ms > 0 and entry.decode_ms_per_token > 0
    assert entry.decode_tokens_per_s > 0 and entry.prompt_tokens > 0 and entry.new_tokens == 4
    assert entry.onnxruntime_version == edgellm.runtime.llm.ort.__version__ and entry.date[:2] == "20"
    # The folder still verifies: the results file is not part of the model's checksums.
    verify_checksums(model_copy, read_manifest(model_copy))
    info = cli("info", str(model_copy), "--verify")
    assert info.returncode == 0, info.stderr
    assert "measured (1 saved by `edgellm bench --save`):" in info.stdout and "threads=1" in info.stdout
    assert f"decode {entry.decode_ms_per_token:.1f} ms/token" in info.stdout
    assert "checksums: 5 files ok" in info.stdout  # model.onnx, model.kernels.onnx, weights, tokenizer, template
    as_json = json.loads(cli("info", str(model_copy), "--json").stdout)
    assert as_json["benchmarks"] == [entry.to_dict()]


def test_saving_again_replaces_the_same_device_and_adds_others(model_copy):
    bench_save(model_copy, "--threads", "1")
    bench_save(model_copy, "--threads", "2")
    first = {e.threads: e for e in edgellm.read_benchmarks(model_copy)}
    assert set(first) == {1, 2}
    bench_save(model_copy, "--threads", "1")
    again = {e.threads: e for e in edgellm.read_benchmarks(model_copy)}
    assert set(again) == {1, 2} and again[2] == first[2] and again[1].date >= first[1].date
    assert not [p for p in model_copy.iterdir() if p.name.startswith(f".{BENCHMARKS_NAME}")]  # no temp file left


def test_figures_of_an_earlier_conversion_are_not_shown(model_copy, tiny_int8_dir):
    entry = DeviceBenchmark(provider="CPUExecutionProvider", device="x", threads=None, ttft_ms=1.0,
                            decode_ms_per_token=2.0, decode_tokens_per_s=500.0, prefill_tokens_per_s=1.0,
                            prompt_tokens=1, new_tokens=1, runs=1, peak_rss_mb=1.0, peak_device_memory_mb=None,
                            cpu_model="x", machine="x86_64", date="2026-01-01T00:00:00+00:00",
                            edgellm_version="0", onnxruntime_version="0")
    save_benchmark(model_copy, entry)
    assert edgellm.read_benchmarks(model_copy) == [entry]
    data = json.loads((model_copy / BENCHMARKS_NAME).read_text())
    data["model_fingerprint"] = "0" * 64  # as if the folder had been converted again since
    (model_copy / BENCHMARKS_NAME).write_text(json.dumps(data))
    assert edgellm.read_benchmarks(model_copy) == []


def test_a_damaged_results_file_is_one_clear_error(model_copy):
    (model_copy / BENCHMARKS_NAME).write_text("{not json")
    with pytest.raises(ModelFormatError, match="is not a valid benchmarks file .* Fix: delete it"):
        edgellm.read_benchmarks(model_copy)
    done = cli("info", str(model_copy))
    lines = app_stderr_lines(done.stderr)
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr


def test_save_refuses_a_draft_setup_before_running(model_copy):
    done = cli("bench", "-m", str(model_copy), "--save", "--draft", "prompt-lookup")
    assert done.returncode == 1 and "--save keeps the model's own figures" in done.stderr
    assert not (model_copy / BENCHMARKS_NAME).exists()
