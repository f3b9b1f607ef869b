"""`edgellm convert` stopped at each phase: no half model ever loads, a stopped convert removes its own
partial folder, and the next convert to the same output removes what a killed one left behind.

Each case runs the real CLI on the tiny model in a child process that pauses at the named phase (the
pipeline's step hook, or just before the final rename), then sends the signal there, so the phase is
exact and not a race against the clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgellm.errors import ModelFormatError
from edgellm.manifest import MANIFEST_NAME, read_manifest, verify_checksums

# Runs `edgellm convert ARGS...` and stops for 10 minutes at PHASE (a pipeline step name prefix;
# "inside-load": in transformers' from_pretrained; "publish": after the manifest is written, just
# before the folder is renamed into place).
DRIVER = r"""
import sys, time
import edgellm.convert.output as output
import edgellm.convert.pipeline as pipeline

phase = sys.argv[1]

def pause(name):
    print("PAUSED " + name, flush=True)
    time.sleep(600)

if phase == "inside-load":  # inside transformers' weight loading, within convert's broad error handling
    import transformers
    real_load = transformers.AutoModelForCausalLM.from_pretrained
    def from_pretrained(*args, **kwargs):
        pause("inside-load")
        return real_load(*args, **kwargs)
    transformers.AutoModelForCausalLM.from_pretrained = from_pretrained
elif phase == "publish":
    real_publish = output.publish
    def publish(staging, out_dir):
        pause("publish")
        real_publish(staging, out_dir)
    output.publish = publish
else:
    real_step = pipeline._Steps.step
    def step(self, name):
        real_step(self, name)
        if name.startswith(phase):
            pause(name)
    pipeline._Steps.step = step

from edgellm.cli import main
main(sys.argv[2:], prog_name="edgellm")
"""

PHASES = ["load", "export", "quantize", "validate", "write", "publish"]
# (phase, signal): every phase under SIGKILL (nothing can clean up: the next run must), and the
# signals a process can see (Ctrl-C, `kill`, a closed terminal) spread over the phases.
CASES = [(phase, signal.SIGKILL) for phase in PHASES] + [
    ("load", signal.SIGINT), ("validate", signal.SIGINT), ("write", signal.SIGTERM), ("publish", signal.SIGTERM),
    ("export", signal.SIGHUP), ("inside-load", signal.SIGTERM),  # not mistaken for a damaged source file
]


def _partials(parent: Path, name: str) -> list[Path]:
    return sorted(parent.glob(f".{name}.partial-*"))


def _default_sigint() -> None:
    """A child started from a background job inherits SIGINT ignored (and convert keeps ignoring it, rightly),
    one started under nohup SIGHUP: give both the default disposition, as in a terminal."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def _stop_at(phase: str, sig: signal.Signals, source: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, phase, "convert", str(source), "-o", str(out), "--quiet",
                             "--no-gate", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    try:
        line = proc.stdout.readline()  # blocks until the child pauses (or exits)
        assert line.startswith("PAUSED " + phase), (line, proc.stderr.read() if proc.poll() is not None else "")
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _assert_nothing_half_loads(folder_parent: Path, out: Path) -> None:
    for leftover in _partials(folder_parent, out.name):
        if (leftover / MANIFEST_NAME).exists():
            verify_checksums(leftover, read_manifest(leftover))  # only a complete, verified folder has a manifest
        else:
            with pytest.raises(ModelFormatError):
                read_manifest(leftover)


@pytest.mark.parametrize("phase,sig", CASES, ids=[f"{p}-{s.name}" for p, s in CASES])
def test_stopped_convert_leaves_no_model_and_no_partial_it_could_remove(phase, sig, tiny_hf_dir, tmp_path):
    out = tmp_path / "out"
    done = _stop_at(phase, sig, tiny_hf_dir, out)
    assert not out.exists(), (phase, sig)
    _assert_nothing_half_loads(tmp_path, out)
    if sig == signal.SIGKILL:
        assert done.returncode == -signal.SIGKILL
        stale = _partials(tmp_path, out.name)
        assert len(stale) == 1, stale  # nothing could clean up: the next run must
        # The next convert to the same output removes it: a complete one (once), or one that fails at once.
        if phase == "validate":
            again = subprocess.run([sys.executable, "-m", "edgellm.cli", "convert", str(tiny_hf_dir), "-o", str(out),
                                    "--quiet", "--no-gate", "--json"], capture_output=True, text=True)
            assert again.returncode == 0 and json.loads(again.stdout)["output"] == str(out), again.stderr
            verify_checksums(out, read_manifest(out))
        else:
            again = subprocess.run([sys.executable, "-m", "edgellm.cli", "convert", str(tmp_path / "missing"), "-o",
                                    str(out), "--quiet"], capture_output=True, text=True)
            assert again.returncode == 1 and again.stderr.startswith("error: source") and not out.exists()
        assert _partials(tmp_path, out.name) == []
    else:
        assert _partials(tmp_path, out.name) == [], (phase, sig, done.stderr)  # it cleaned up after itself
        assert "Traceback" not in done.stderr, done.stderr
        if sig == signal.SIGINT:
            assert done.returncode == 1  # click's "Aborted!" after KeyboardInterrupt
        else:
            assert done.returncode == 128 + sig, done.stderr
            lines = done.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"error: convert was stopped by {sig.name}"), lines


def test_a_force_convert_killed_before_the_swap_keeps_the_old_model(tiny_hf_dir, tiny_fp32_dir, tmp_path):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(tiny_fp32_dir, out)
    before = (out / MANIFEST_NAME).read_text()
    _stop_at("publish", signal.SIGKILL, tiny_hf_dir, out, "--force", "--precision", "fp32")
    assert (out / MANIFEST_NAME).read_text() == before
    verify_checksums(out, read_manifest(out))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_partials_are_judged_by_their_owner(tmp_path, caplog):
    """Unit level: dead owner → removed; live owner (this process) → kept; an unidentifiable (older
    edgellm) name → kept with a warning; a dead --force swap's old folder → restored when OUT is missing."""
    from edgellm.convert import output

    out = tmp_path / "m"
    host, me = output._host_tag(), os.getpid()
    dead = _dead_pid()
    if output._start_time(dead) is not None:  # the pid was reused already: too rare to chase, pick another
        dead = _dead_pid()
    folders = {
        "dead": tmp_path / f".m.partial-{host}-{dead}-123-abc",
        "reused pid": tmp_path / f".m.partial-{host}-{me}-1-abc",  # our pid, another start time
        "alive": tmp_path / f".m.partial-{output._owner_tag()}-abc",
        "other host": tmp_path / f".m.partial-00000000-{dead}-123-abc",
        "legacy": tmp_path / ".m.partial-k2j3h4",
        "old, dead": tmp_path / f".m.old-{host}-{dead}-123",
    }
    for path in folders.values():
        path.mkdir()
        (path / "x").write_text("x")
    with caplog.at_level("INFO", logger="edgellm.convert.output"):
        removed = output.remove_stale(out)
    assert sorted(removed) == sorted([folders["dead"], folders["reused pid"]])
    assert all(folders[k].exists() for k in ("alive", "other host", "legacy"))
    assert (out / "x").read_text() == "x" and not folders["old, dead"].exists()  # put back where it was
    assert any("older edgellm" in r.message for r in caplog.records)


def test_an_old_model_restored_from_a_killed_swap_is_not_overwritten_without_force(tiny_hf_dir, tiny_fp32_dir,
                                                                                    tmp_path):
    """A --force convert killed between its two renames leaves OUT at .OUT.old-...: the next convert puts it back,
    and without --force then refuses to replace it."""
    import shutil

    from edgellm.convert import output

    out = tmp_path / "model"
    shutil.copytree(tiny_fp32_dir, out.with_name(f".model.old-{output._host_tag()}-{_dead_pid()}-123"))
    done = subprocess.run([sys.executable, "-m", "edgellm.cli", "convert", str(tiny_hf_dir), "-o", str(out),
                           "--quiet"], capture_output=True, text=True)
    assert done.returncode == 1 and "already exists" in done.stderr, done.stderr
    verify_checksums(out, read_manifest(out))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
