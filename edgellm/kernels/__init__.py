"""edgellm's own CPU kernels for onnxruntime: the custom op library `libedgellm_ortops.so`.

It registers the op domain `ai.edgellm` with `MatMulQ8`, a drop-in for MatMulNBits (bits 8, block_size 32,
no zero points) computed by a hand-written int8 kernel (q8_kernel.c; AVX512-VNNI, AVX2 or scalar, chosen at
run time). The library is compiled on the machine that uses it (`python -m edgellm.kernels build`, run by
scripts/setup.sh); without it, or with EDGELLM_KERNELS=0, edgellm runs onnxruntime's own kernels.

    from edgellm import kernels
    options = onnxruntime.SessionOptions()
    kernels.register(options)          # False (and one info log saying why) when the library is unusable

Importing this module loads nothing; the library is opened on the first call that needs it.

Environment: EDGELLM_KERNELS=0 turns the kernels off; EDGELLM_Q8_ISA=avx2|scalar forces a lower code path;
EDGELLM_KERNEL_TASKS_PER_CPU=n (default 1) splits each MatMulQ8's rows into n contiguous work items per usable
CPU (more items let idle pool threads take over work from threads a busy machine delays);
EDGELLM_ATTENTION_PARALLEL_FROM=n (default 256) hands a decode step's attention heads to the intra-op pool once
the context holds n positions (below that, handing out 9 small heads costs about what it saves);
EDGELLM_KERNEL_HUGEPAGES=0 keeps the weights out of 2 MB pages (weight_arena.h says why they are the default);
EDGELLM_KERNEL_PACK=0 keeps MatMulNBits' weight layout on the AVX-512 VNNI path instead of packing the weights
into 16-row tiles at load (q8_kernel.c, PACK_PAIR, says why packing is the default);
EDGELLM_KERNEL_LAYER_REGION=0 hands each of a decode step's matmuls to the intra-op pool on its own instead of
the whole layer once (ort_op.cc, LayerStep; the outputs are the same bits either way);
EDGELLM_KERNEL_PREFETCH=bytes (0 off; default 4352 on Intel CPUs and 0 on AMD's, as measured on each) is how far
ahead of a decode step's weight stream the packed kernels prefetch (simd_avx512.h, edgellm_prefetch_distance,
says why; prefetch_distance() reads what the library uses). A value the library cannot use
(EDGELLM_KERNEL_TASKS_PER_CPU outside 1-64, a negative or non-numeric EDGELLM_ATTENTION_PARALLEL_FROM,
EDGELLM_KERNEL_PREFETCH outside 0-1048576, an EDGELLM_Q8_ISA other than avx2 or scalar) is refused at load.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # onnxruntime is only needed by register(), which receives its SessionOptions
    import onnxruntime as ort

logger = logging.getLogger(__name__)

ENV = "EDGELLM_KERNELS"
_OFF = {"0", "off", "false", "no"}
HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "libedgellm_ortops.so"
SOURCES = ("ort_op.cc", "weight_arena.cc", "q8_kernel.c", "q4_kernel.c", "attention.c")
HEADERS = ("ort_abi.h", "q8_kernel.h", "q4_kernel.h", "scratch_layout.h", "attention.h", "simd_avx512.h",
           "weight_arena.h")
_X86 = {"x86_64", "amd64", "x64"}

_logged: set[str] = set()
_loaded: dict[Path, ctypes.CDLL] = {}


class BuildError(RuntimeError):
    """The kernel library could not be compiled; the message names the cause and the fix."""


def default_library() -> Path:
    """Where `build()` writes the library and `library_path()` looks for it: beside this module."""
    return HERE / LIBRARY_NAME


def _unused(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        logger.info("edgellm kernels unused: %s", reason)


def _turned_off() -> bool:
    return os.environ.get(ENV, "").strip().lower() in _OFF


def _open(path: Path) -> ctypes.CDLL:
    if path not in _loaded:
        lib = ctypes.CDLL(str(path))
        lib.edgellm_q8_isa.restype = ctypes.c_char_p
        lib.edgellm_q8_isa.argtypes = []
        lib.RegisterCustomOps  # noqa: B018 - raises AttributeError if this is not our op library
        _loaded[path] = lib
    return _loaded[path]


def library_path() -> Path | None:
    """The kernel library to register, or None when edgellm's kernels cannot or should not run here:
    EDGELLM_KERNELS=0 (also off/false/no), a non-x86 CPU, the library not built, or not loadable.
    The reason is logged once at info level."""
    if _turned_off():
        _unused(f"{ENV}={os.environ[ENV]!r} turns them off")
        return None
    machine = platform.machine().lower()
    if machine not in _X86 or not sys.platform.startswith("linux"):
        _unused(f"they are built for Linux x86-64 only, this is {sys.platform} {machine or 'unknown CPU'}")
        return None
    path = default_library()
    if not path.is_file():
        _unused(f"{path} is not built. Fix: python -m edgellm.kernels build (needs g++)")
        return None
    try:
        _open(path)
    except (OSError, AttributeError) as exc:
        _unused(f"{path} does not load ({exc}). Fix: python -m edgellm.kernels build")
        return None
    stale = [name for name in SOURCES + HEADERS
             if (HERE / name).is_file() and (HERE / name).stat().st_mtime > path.stat().st_mtime]
    if stale and "stale" not in _logged:
        _logged.add("stale")
        logger.warning("%s is older than %s: it runs the old kernels. Fix: python -m edgellm.kernels build",
                       path.name, ", ".join(stale))
    return path


def isa() -> str:
    """The code path the kernels run on this CPU: "avx512vnni", "avx2" or "scalar" (EDGELLM_Q8_ISA may force a
    lower one), or "unavailable" when library_path() is None."""
    path = library_path()
    if path is None:
        return "unavailable"
    return _open(path).edgellm_q8_isa().decode()


# The library reads these once per process and would quietly fall back on a value it cannot use: checked here,
# at load, so a typo is one clear error instead of a setting that silently does nothing.
# name: (lowest, highest or None, the default as the error states it, a value to suggest)
_INT_SETTINGS = {"EDGELLM_KERNEL_TASKS_PER_CPU": (1, 64, "1", 1),
                 "EDGELLM_ATTENTION_PARALLEL_FROM": (0, None, "256", 256),
                 "EDGELLM_KERNEL_PREFETCH": (0, 1 << 20, "4352 on Intel CPUs, 0 on AMD's", 4352)}
_ISA_SETTING = ("EDGELLM_Q8_ISA", ("avx2", "scalar"))


def check_settings() -> None:
    """Raise InvalidParameterError naming the variable, its value, the allowed range and the fix."""
    from ..errors import InvalidParameterError

    for name, (low, high, default, example) in _INT_SETTINGS.items():
        raw = os.environ.get(name)
        if raw is None or raw.strip() == "":
            continue
        limit = f"a whole number from {low} to {high}" if high is not None else f"a whole number >= {low}"
        try:
            value = int(raw.strip())
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise InvalidParameterError(f"{name}={raw!r}: must be {limit} (default {default}). "
                                        f"Fix: unset it, or set e.g. {name}={example}.")
    name, allowed = _ISA_SETTING
    raw = os.environ.get(name)
    if raw and raw not in allowed:  # compared as the library does (strcmp): " avx2" would be ignored there
        raise InvalidParameterError(f"{name}={raw!r}: it can only lower the code path, to one of "
                                    f"{', '.join(allowed)}. Fix: unset it to run the best path this CPU has.")


def prefetch_distance() -> int | None:
    """Bytes ahead of a decode step's weight stream that the kernels prefetch in this process (0: none, as on AMD
    CPUs by default or where the packed path does not run), or None when library_path() is None. Results files
    record it (edgellm.record.kernels), since the default depends on the CPU."""
    path = library_path()
    if path is None:
        return None
    check_settings()
    try:
        read = _open(path).edgellm_kernel_prefetch
    except AttributeError:
        raise BuildError(f"{path} predates edgellm_kernel_prefetch (it was built from older sources). "
                         "Fix: python -m edgellm.kernels build") from None
    read.restype = ctypes.c_int64
    read.argtypes = []
    return int(read())


def register(options: "ort.SessionOptions") -> bool:
    """Register the kernel library (op domain ai.edgellm) on onnxruntime SessionOptions.

    True when registered; False when library_path() is None or onnxruntime refuses the library (the reason is
    logged once at info level). A session whose graph uses ai.edgellm ops needs this before it is created.
    Raises InvalidParameterError for a kernel setting in the environment that the library cannot use."""
    if not _turned_off():
        check_settings()
    path = library_path()
    if path is None:
        return False
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

    try:
        options.register_custom_ops_library(str(path))
    except (Fail, RuntimeException, RuntimeError) as exc:
        _unused(f"onnxruntime refused {path}: {exc}")
        return False
    return True


def _compiler(env: str, names: tuple[str, ...]) -> str | None:
    for name in (os.environ.get(env, ""), *names):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build(out: Path | None = None, *, quiet: bool = False) -> Path:
    """Compile ort_op.cc + q8_kernel.c into the shared library (default: beside this module) and return its
    path. Never -march=native: q8_kernel.c picks its instruction set when it runs, so the file works on any
    x86-64 CPU. The file is replaced atomically. Raises BuildError naming the cause and the fix."""
    out = Path(out) if out is not None else default_library()
    machine = platform.machine().lower()
    if machine not in _X86 or not sys.platform.startswith("linux"):
        raise BuildError(f"edgellm's kernels are built for Linux x86-64 only, this is {sys.platform} {machine}; "
                         "edgellm runs onnxruntime's kernels here, nothing to build")
    cxx = _compiler("CXX", ("g++", "c++", "clang++"))
    cc = _compiler("CC", ("gcc", "cc", "clang"))
    if cxx is None or cc is None:
        raise BuildError("no C/C++ compiler found (looked for $CXX/g++/c++/clang++ and $CC/gcc/cc/clang). "
                         "Fix: apt-get install g++ (or set CXX and CC), then python -m edgellm.kernels build")
    missing = [name for name in SOURCES + HEADERS if not (HERE / name).is_file()]
    if missing:
        raise BuildError(f"the kernel sources {missing} are not in {HERE} (this edgellm was installed without "
                         "them). Fix: install edgellm from its source tree")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgellm-kernels-") as tmp:
        tmpdir = Path(tmp)
        steps = [
            [cc, "-O3", "-fPIC", "-c", str(HERE / "q8_kernel.c"), "-o", str(tmpdir / "q8_kernel.o")],
            [cc, "-O3", "-fPIC", "-c", str(HERE / "q4_kernel.c"), "-o", str(tmpdir / "q4_kernel.o")],
            [cc, "-O3", "-fPIC", "-c", str(HERE / "attention.c"), "-o", str(tmpdir / "attention.o")],
            [cxx, "-O3", "-fPIC", "-std=c++17", "-fvisibility=hidden", "-c", str(HERE / "ort_op.cc"),
             "-o", str(tmpdir / "ort_op.o")],
            [cxx, "-O3", "-fPIC", "-std=c++17", "-fvisibility=hidden", "-c", str(HERE / "weight_arena.cc"),
             "-o", str(tmpdir / "weight_arena.o")],
            [cxx, "-shared", "-o", str(tmpdir / LIBRARY_NAME), str(tmpdir / "ort_op.o"), str(tmpdir / "weight_arena.o"),
             str(tmpdir / "q8_kernel.o"), str(tmpdir / "q4_kernel.o"), str(tmpdir / "attention.o"), "-lm"],
        ]
        for cmd in steps:
            if not quiet:
                logger.info("%s", " ".join(cmd))
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise BuildError(f"{Path(cmd[0]).name} failed (exit {done.returncode}) on "
                                 f"{' '.join(cmd)}:\n{done.stderr.strip()[-4000:]}")
        staged = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.copyfile(tmpdir / LIBRARY_NAME, staged)
        os.replace(staged, out)
    _loaded.pop(out.resolve(), None)
    return out


__all__ = ["ENV", "BuildError", "build", "default_library", "isa", "library_path", "register"]
