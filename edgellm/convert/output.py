"""Where `edgellm convert` writes: a hidden staging folder beside OUT, renamed into place whole.

- Before any work, OUT's parent must be (or become) a folder this process can write in: the staging
  folder is created first, so `-o` under a regular file, on a read-only mount or in a folder we may
  not write fails in one line before a source is resolved or loaded. (The test is the real mkdir,
  not os.access: root may write where the mode bits say no, and may not on a read-only mount.)
- The staging folder is `.OUT.partial-HOST-PID-START-XXXX` (HOST: a short hash of the host name,
  START: the process start time), so the next convert to OUT removes partial folders whose process
  is dead (SIGKILL, power cut) and never one that is still running, even if its pid was reused.
- SIGINT, SIGTERM and SIGHUP raise inside convert (SIGINT as KeyboardInterrupt), so its `finally`
  removes its own partial folder; the previous handlers come back afterwards.
- The manifest is written last and the folder renamed into place, so no half model ever loads.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError, OutputExistsError, StoppedBySignal

logger = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_OWNER = re.compile(r"-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-(?P<start>\d+)(?:-|$)")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _start_time(pid: int) -> int | None:
    """The process start time in clock ticks since boot (/proc/PID/stat field 22), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _owner_tag() -> str:
    return f"{_host_tag()}-{os.getpid()}-{_start_time(os.getpid()) or 0}"


def _owner_alive(name: str) -> bool | None:
    """Is the process that named this folder still running? None: the name carries no owner (older edgellm)."""
    match = _OWNER.search(name)
    if match is None:
        return None
    if match["host"] != _host_tag():
        return True  # another machine's convert (a shared folder): we cannot tell, so keep it
    pid, start = int(match["pid"]), int(match["start"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    now = _start_time(pid)
    return not (start and now is not None and now != start)  # a different start time: the pid was reused


def remove_stale(out_dir: Path) -> list[Path]:
    """Remove partial folders of OUT left by dead converts; restore OUT from a dead --force swap. Returns what it removed."""
    removed = []
    prefix = glob.escape(f".{out_dir.name}.")
    for path in sorted(out_dir.parent.glob(prefix + "partial-*")) + sorted(out_dir.parent.glob(prefix + "old-*")):
        if not path.is_dir() or path.is_symlink():
            continue
        rest = path.name[len(out_dir.name) + 2:]  # "partial-..." or "old-..."
        alive = _owner_alive(rest)
        if alive is None:
            logger.warning("%s was left by an older edgellm convert that cannot be identified as finished; "
                           "remove it by hand if no convert is running (rm -r %s)", path, path)
            continue
        if alive:
            continue
        if rest.startswith("old-") and not out_dir.exists():
            try:
                os.replace(path, out_dir)  # killed between the two renames of a --force swap: put the old model back
            except OSError as exc:
                logger.warning("could not restore %s from %s (%s)", out_dir, path, exc)
            else:
                logger.warning("restored %s from %s, left by a convert that was killed mid-swap", out_dir, path.name)
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed %s, left by a convert that did not finish", path)
        removed.append(path)
    return removed


def check_target(out_dir: Path, force: bool) -> None:
    """Fast checks on -o that need no writing."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"-o {str(out_dir)!r} exists and is a file, not a folder. Fix: choose another -o.")
    if out_dir.exists() and not force:
        raise OutputExistsError(f"output folder {str(out_dir)!r} already exists. Fix: choose another -o, or pass "
                                "--force to replace it (the old folder stays until the new one is complete).")
    _check_parents(out_dir)


def _check_parents(out_dir: Path) -> None:
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"-o {str(out_dir)!r} lies under {str(parent)!r}, which is a file, not a folder. "
                                  "Fix: choose an -o whose parent folders are folders.")
            break


def check_writable(out_dir: Path) -> None:
    """For commands that fill OUT in place (distill): before any slow work, -o must not be or lie under a
    file, and its parent must take a new folder (tried for real, then removed)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"-o {str(out_dir)!r} exists and is a file, not a folder. Fix: choose another -o.")
    _check_parents(out_dir)
    shutil.rmtree(_make_staging(out_dir))


def _make_staging(out_dir: Path) -> Path:
    """Create OUT's parent and the staging folder in it: the proof that we can write there."""
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-{_owner_tag()}-", dir=out_dir.parent))
    except OSError as exc:
        raise OutputError(f"cannot write the output folder {str(out_dir)!r}: {_reason(exc)}. Fix: choose an -o in a "
                          "folder you can write to (not read-only, not under a file).") from exc
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it owner-only; the final folder should read like any other
    return staging


def _reason(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    return f"{exc.strerror or exc}{where}"


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While inside: SIGTERM/SIGHUP raise StoppedBySignal, SIGINT raises KeyboardInterrupt (unless ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; the caller owns signals there
        return

    def stop(signum, frame):
        raise StoppedBySignal(f"convert was stopped by {signal.Signals(signum).name}; its partial output was "
                              "removed and the output folder left as it was. Fix: run the command again.", signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        current = signal.getsignal(sig)
        if current is signal.SIG_IGN:
            continue  # e.g. nohup, or a background job's SIGINT: keep ignoring it
        if sig == signal.SIGINT:
            if current is signal.default_int_handler:
                continue  # already raises KeyboardInterrupt
            previous[sig] = signal.signal(sig, signal.default_int_handler)
        else:
            previous[sig] = signal.signal(sig, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def staging_folder(out_dir: Path, force: bool) -> Iterator[Path]:
    """Check -o, clear dead partials of OUT, and yield a fresh staging folder that is removed on any exit."""
    _check_parents(out_dir)
    if out_dir.parent.is_dir():
        remove_stale(out_dir)  # first: it may put back an OUT that a killed --force swap had moved aside
    check_target(out_dir, force)
    staging = _make_staging(out_dir)
    with _signals_raise():
        try:
            yield staging
        except OSError as exc:
            if exc.errno in _DISK_FULL:
                raise OutputError(f"the disk filled up while writing {str(out_dir)!r}: {_reason(exc)}. Fix: free "
                                  f"space on {str(out_dir.parent)!r} (convert needs about 3x the fp32 model size "
                                  "there while it runs) and run it again.") from exc
            raise
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)


def publish(staging: Path, out_dir: Path) -> None:
    """Atomic on one filesystem: the new folder appears whole; an old one is removed only afterwards.

    Signals wait until both renames are done (a Ctrl-C between them would leave no folder at OUT)."""
    blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if in_main else None
    try:
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{_owner_tag()}")
            os.replace(out_dir, old)
        os.replace(staging, out_dir)
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
