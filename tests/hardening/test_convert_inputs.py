"""Bad `-o` folders and bad sources: `edgellm convert` answers with one line naming the value, the limit and
the fix (exit 1), before any slow work, and leaves neither an output folder nor a partial one behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgellm.cli import main


@contextlib.contextmanager
def read_only(folder: Path):
    """Make `folder` refuse new entries, honestly for the user running the tests: mode bits for a normal user;
    for root (who ignores mode bits) the immutable attribute, else a read-only bind mount. Yields the method."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield "chmod 555"
        finally:
            folder.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        try:
            yield "chattr +i"
        finally:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        return
    if subprocess.run(["mount", "--bind", "-o", "ro", str(folder), str(folder)], capture_output=True).returncode == 0:
        try:
            yield "read-only bind mount"
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    raise RuntimeError(f"cannot make {folder} read-only for root here (neither chattr +i nor mount --bind -o ro "
                       "works); this test needs one of them")


def _copy_hf(tiny_hf_dir: Path, target: Path) -> Path:
    shutil.copytree(tiny_hf_dir, target)
    return target


def _drop_a_weight(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    save_file(tensors, path, metadata={"format": "pt"})


# (case, setup(tmp, tiny_hf_dir) -> (source, out, extra args), fragments of the one-line error)
def _o_under_file(tmp, hf):
    (tmp / "notes.txt").write_text("x")
    return str(tmp / "missing-source"), tmp / "notes.txt" / "model", []


def _o_deep_under_file(tmp, hf):
    (tmp / "notes.txt").write_text("x")
    return str(tmp / "missing-source"), tmp / "notes.txt" / "a" / "b" / "model", []


def _o_is_file(tmp, hf):
    (tmp / "model").write_text("x")
    return str(tmp / "missing-source"), tmp / "model", ["--force"]


def _o_exists(tmp, hf):
    (tmp / "model").mkdir()
    return str(hf), tmp / "model", []


def _source_missing(tmp, hf):
    return str(tmp / "nope.gguf"), tmp / "out", []


def _source_fifo(tmp, hf):
    os.mkfifo(tmp / "pipe.gguf")
    return str(tmp / "pipe.gguf"), tmp / "out", []


def _source_not_gguf(tmp, hf):
    (tmp / "notes.gguf").write_text("hello")
    return str(tmp / "notes.gguf"), tmp / "out", []


def _config_not_json(tmp, hf):
    src = _copy_hf(hf, tmp / "src")
    (src / "config.json").write_text("{not json")
    return str(src), tmp / "out", []


def _config_a_list(tmp, hf):
    src = _copy_hf(hf, tmp / "src")
    (src / "config.json").write_text("[1, 2]")
    return str(src), tmp / "out", []


def _config_other_arch(tmp, hf):
    src = tmp / "gpt2"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return str(src), tmp / "out", []


def _no_weights(tmp, hf):
    src = _copy_hf(hf, tmp / "src")
    (src / "model.safetensors").unlink()
    return str(src), tmp / "out", []


def _corrupt_weights(tmp, hf):
    src = _copy_hf(hf, tmp / "src")
    (src / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage" + bytes(64))
    return str(src), tmp / "out", []


def _missing_tensor(tmp, hf):
    src = _copy_hf(hf, tmp / "src")
    _drop_a_weight(src)
    return str(src), tmp / "out", []


def _corrupt_tokenizer(tmp, hf):
    src = _copy_hf(hf, tmp / "src")
    (src / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nope"}}')
    return str(src), tmp / "out", []


def _draft_head_too_small(tmp, hf):
    return str(hf), tmp / "out", ["--draft-head", "10"]


def _smooth_alpha_out_of_range(tmp, hf):
    return str(hf), tmp / "out", ["--smooth-alpha", "2"]


CASES = [
    ("-o under a regular file", _o_under_file, ["notes.txt", "which is a file", "Fix:"]),
    ("-o several levels under a regular file", _o_deep_under_file, ["notes.txt", "which is a file"]),
    ("-o is a regular file (even with --force)", _o_is_file, ["exists and is a file", "Fix: choose another -o"]),
    ("-o exists without --force", _o_exists, ["already exists", "--force"]),
    ("source missing", _source_missing, ["nope.gguf", "neither a file", "Fix:"]),
    ("source is a FIFO (would block)", _source_fifo, ["pipe.gguf", "not a regular file"]),
    ("source is not a GGUF file", _source_not_gguf, ["not a GGUF file", "b'hell'"]),
    ("config.json is not JSON", _config_not_json, ["config.json cannot be read as JSON", "Fix:"]),
    ("config.json is a JSON list", _config_a_list, ["holds a JSON list, not an object"]),
    ("unsupported architecture", _config_other_arch, ["'gpt2' model", "Fix:"]),
    ("folder without weights", _no_weights, ["no weights", "Fix:"]),
    ("corrupt weight file", _corrupt_weights, ["transformers cannot load", "Fix:"]),
    ("a weight tensor missing (would be random)", _missing_tensor,
     ["lacks 1 weight", "model.layers.1.mlp.down_proj.weight", "random values"]),
    ("corrupt tokenizer.json", _corrupt_tokenizer, ["transformers cannot load", "Fix:"]),
    ("--draft-head below its limit", _draft_head_too_small, ["draft_head=10", "at least 256"]),
    ("--smooth-alpha out of range", _smooth_alpha_out_of_range, ["smooth_alpha=2.0", "[0, 1]"]),
]


def _convert(source: str, out: Path, extra: list[str]):
    return CliRunner().invoke(main, ["convert", source, "-o", str(out), "--quiet", *extra])


def _assert_one_line_error(result, fragments: list[str]) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert "Traceback" not in result.output
    return lines[0]


@pytest.mark.parametrize("case,setup,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_convert_input_is_one_line_and_leaves_nothing(case, setup, fragments, tiny_hf_dir, tmp_path):
    before = {p.name for p in tmp_path.iterdir()}
    source, out, extra = setup(tmp_path, tiny_hf_dir)
    existed = out.exists()
    _assert_one_line_error(_convert(source, out, extra), fragments)
    assert out.exists() == existed, case
    left = [p for p in out.parent.glob(".*partial-*")] if out.parent.is_dir() else []
    assert left == [], left


def test_read_only_parent_is_refused_before_the_source_is_looked_at(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    with read_only(parent) as how:
        result = _convert(str(tmp_path / "missing-source"), parent / "model", [])
        line = _assert_one_line_error(result, ["cannot write the output folder", "locked", "Fix:"])
        assert "source" not in line, (how, line)  # -o is checked first, before any work on the source
        assert list(parent.iterdir()) == []


def test_read_only_parent_two_levels_up_is_refused(tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    with read_only(parent):
        _assert_one_line_error(_convert(str(tmp_path / "missing-source"), parent / "a" / "b" / "model", []),
                               ["cannot write the output folder", "Fix:"])
        assert list(parent.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="only root ignores mode bits")
def test_root_is_not_refused_where_mode_bits_alone_say_read_only(tmp_path):
    """The check is the real mkdir, not a guess from os.access or the mode: root may write in a 0555 folder,
    so convert goes on (here to the source check, which fails)."""
    parent = tmp_path / "mode555"
    parent.mkdir()
    parent.chmod(0o555)
    line = _assert_one_line_error(_convert(str(tmp_path / "missing-source"), parent / "model", []),
                                  ["missing-source", "neither a file"])
    assert "cannot write" not in line
    assert [p for p in parent.iterdir()] == []  # and the staging folder it made is gone


@pytest.mark.parametrize("where", ["under a file", "read-only parent"])
def test_distill_checks_its_output_before_loading_the_teacher(where, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    out = tmp_path / "notes.txt" / "student" if where == "under a file" else locked / "student"
    with read_only(locked) if where == "read-only parent" else contextlib.nullcontext():
        result = CliRunner().invoke(main, ["distill", str(tmp_path / "missing-teacher"), "-o", str(out)])
        line = _assert_one_line_error(result, ["-o" if where == "under a file" else "cannot write", "Fix:"])
        assert "missing-teacher" not in line and list(locked.iterdir()) == []
