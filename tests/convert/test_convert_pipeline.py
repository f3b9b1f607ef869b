"""convert writes a complete, self-describing folder atomically, and refuses bad input in one line."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgellm.manifest import read_manifest, sha256_file, verify_checksums


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgellm.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_manifest_describes_the_folder(tiny_int8_dir, tiny_hf_dir):
    m = read_manifest(tiny_int8_dir)
    assert m.precision == "int8" and m.architecture == "llama"
    assert m.dims.num_layers == 2 and m.dims.num_kv_heads == 2 and m.dims.head_dim == 16
    assert m.io.past_key[1] == "past_key_values.1.key" and m.io.present_value[0] == "present.0.value"
    assert set(m.checksums) == {"model.onnx", "model.onnx.data", "tokenizer.json", "chat_template.jinja",
                                "model.kernels.onnx"}  # the kernel twin (tests/convert/test_kernel_graph.py)
    for name, digest in m.checksums.items():
        assert sha256_file(tiny_int8_dir / name) == digest
    assert m.source["kind"] == "hf" and m.source["path"] == str(tiny_hf_dir)
    assert m.generation.eos_token_ids == (2,)
    v = m.validation
    assert set(v.scores) == {"fp32", "int8"} and v.perplexity_ratio and v.greedy_agreement is not None
    assert v.chat_agreement.prompts == 20 and set(v.speed) == set(v.kv_consistency) == {"fp32", "int8"}
    assert v.tokenizer_identical_ids is True
    assert v.source_max_abs_diff < 1e-3
    assert v.kv_consistency["fp32"].max_abs_diff_stepwise < 1e-3
    assert v.sizes_bytes["int8"] < v.sizes_bytes["fp32"]
    # The fixture converts with --no-gate; the verdict is still computed and the thresholds recorded.
    assert v.gate.enforced is False and v.gate.thresholds.max_ppl_ratio == 1.03
    assert v.gate.passed == (not v.gate.failures)
    assert "onnxruntime" in m.tools and "torch" in m.tools
    verify_checksums(tiny_int8_dir, m)
    umask = os.umask(0)
    os.umask(umask)
    assert tiny_int8_dir.stat().st_mode & 0o777 == 0o777 & ~umask  # like any new folder, not mkdtemp's owner-only


def test_interrupted_convert_leaves_nothing_that_loads(tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "convert", str(tiny_hf_dir), "-o", str(out),
                             "--quiet", "--no-gate"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    killed = False
    while time.time() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.glob(".out.partial-*") if (p / "model.onnx").exists()]
        if partial:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed, "convert finished before it could be interrupted"
    assert not out.exists()
    from edgellm import ModelFormatError, load

    for leftover in tmp_path.glob(".out.partial-*"):
        with pytest.raises(ModelFormatError):
            load(leftover)


def test_force_replaces_only_after_success(tiny_hf_dir, tiny_fp32_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_fp32_dir, out)
    before = (out / "edgellm.json").read_text()
    done = run_cli("convert", str(tiny_hf_dir / "missing"), "-o", str(out), "--force")
    assert done.returncode != 0 and (out / "edgellm.json").read_text() == before


@pytest.fixture
def bad_inputs(tmp_path, tiny_hf_dir):
    truncated = tmp_path / "truncated.gguf"
    from edgellm.convert.sources import KNOWN_MODELS, _known_model_file

    real = _known_model_file(KNOWN_MODELS["smollm2-135m-instruct"])
    with open(real, "rb") as src:
        truncated.write_bytes(src.read(3_000_000))
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("hello")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    existing = tmp_path / "exists"
    existing.mkdir()
    return {
        "missing file": (str(tmp_path / "nope.gguf"), "neither a file"),
        "truncated gguf": (str(truncated), "truncated"),
        "not a gguf": (str(not_gguf), "not a GGUF file"),
        "unsupported architecture": (str(gpt2), "'gpt2' model"),
        "output exists": (str(tiny_hf_dir), "already exists"),
    }, existing


def test_bad_input_gives_one_line_error_and_no_output(bad_inputs, tmp_path):
    cases, existing = bad_inputs
    for label, (source, phrase) in cases.items():
        out = existing if label == "output exists" else tmp_path / f"out-{label.replace(' ', '-')}"
        done = run_cli("convert", source, "-o", str(out), "--quiet")
        assert done.returncode != 0, label
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), (label, done.stderr)
        assert phrase in lines[0] and "Fix:" in lines[0], (label, lines[0])
        assert "Traceback" not in done.stderr
        if label != "output exists":
            assert not out.exists(), label
        else:
            assert list(existing.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]
