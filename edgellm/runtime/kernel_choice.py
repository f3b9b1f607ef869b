"""Which decode graph a CPU session loads: the folder's kernel twin (edgellm's own MatMul) or model.onnx.

`edgellm convert` writes `model.kernels.onnx` beside `model.onnx` for int8 and int4 CPU models
(edgellm/convert/kernel_graph.py): the same graph with its MatMulNBits nodes as `ai.edgellm.MatMulQ8`
(an int4 twin's reading the source's own 4-bit blocks), which only edgellm's kernel library
(edgellm.kernels) implements. The
twin runs when all of these hold, else the standard graph does (and the reason is logged once):
the session runs on the CPU provider, the folder has the twin, the library is there for this
machine and runs its AVX-512 VNNI path (the measured one), and the user did not turn it off
(`load(..., kernels=False)` or `EDGELLM_KERNELS=0`).
`kernels=True` (or `EDGELLM_KERNELS=1`) makes the twin required: a reason it cannot run is an
error naming the fix. The argument wins over the variable.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InvalidParameterError, KernelError

logger = logging.getLogger(__name__)

ENV = "EDGELLM_KERNELS"
_ENV_VALUES = {"0": False, "off": False, "false": False, "no": False,
               "1": True, "on": True, "true": True, "yes": True, "": None, "auto": None}
_logged: set[str] = set()
LIBRARY_FIX = "python -m edgellm.kernels build (needs g++; scripts/setup.sh runs it)"
# Auto mode runs the twin only where its kernels were measured faster than onnxruntime's (benchmarks/peers.json):
# AVX-512 VNNI. The avx2 and scalar paths are correct (tested) but not faster for prompts (no tile kernel).
MEASURED_ISA = "avx512vnni"


@dataclass(frozen=True)
class GraphChoice:
    """The decode graph a session runs and why. kernels: edgellm's kernel library is registered and its
    ops run (the twin); library: that library's file; isa: the instruction set its kernels dispatch to."""

    path: Path
    kernels: bool
    reason: str
    library: str | None = None
    isa: str | None = None
    required: bool = False  # kernels=True / EDGELLM_KERNELS=1: failing to run them is an error, not a fallback

    @property
    def graph(self) -> str:
        return self.path.name

    def describe(self) -> str:
        """One line for `edgellm info` and `edgellm bench`."""
        if self.kernels:
            return f"{self.graph} with edgellm kernels ({self.isa or 'ISA unknown'}; {self.library})"
        return f"{self.graph} (onnxruntime kernels: {self.reason})"

    def to_dict(self) -> dict:
        return {"graph": self.graph, "kernels": self.kernels, "isa": self.isa, "library": self.library,
                "reason": self.reason}

    def fallback(self, model_path: Path, why: str) -> "GraphChoice":
        """The standard graph instead of this twin (auto mode, after the twin failed to register or load)."""
        return GraphChoice(model_path, False, why)


def wanted(kernels: bool | None) -> bool | None:
    """The caller's choice, or EDGELLM_KERNELS when the caller left it to None (auto)."""
    if kernels is not None:
        if not isinstance(kernels, bool):
            raise InvalidParameterError(f"kernels={kernels!r:.40} must be True (required), False (never) or None "
                                        "(use them where they can run). Fix: pass one of those.")
        return kernels
    value = os.environ.get(ENV, "").strip().lower()
    if value not in _ENV_VALUES:
        raise InvalidParameterError(f"{ENV}={os.environ[ENV]!r} is not a setting: it must be 0 (never use edgellm's "
                                    "kernels), 1 (require them) or auto. Fix: set one of those, or unset it.")
    return _ENV_VALUES[value]


def _library() -> tuple[object | None, str | None, str, str]:
    """(the edgellm.kernels module, its library file, why not, the fix) — module and file None when unusable."""
    try:
        from .. import kernels
    except ImportError as exc:
        return None, None, f"this edgellm has no kernel library package ({exc})", "pip install -U edgellm"
    path = kernels.library_path()
    if path is None:
        return (kernels, None, "edgellm.kernels has no usable libedgellm_ortops.so here (not built, or not a Linux "
                "x86-64 machine; its info log says which)", LIBRARY_FIX)
    return kernels, str(path), "", ""


def _isa(kernels: object) -> str | None:
    isa = getattr(kernels, "isa", None)
    try:
        return str(isa()) if callable(isa) else None
    except (OSError, RuntimeError, ValueError) as exc:  # a library that loads but cannot say: not fatal
        logger.debug("edgellm.kernels.isa() failed: %s", exc)
        return None


def choose(model_path: Path, kernel_path: Path | None, provider: str, kernels: bool | None) -> GraphChoice:
    """The graph to load, from the folder's files, the first provider and the user's choice (see `wanted`).

    Raises KernelError when the twin is required (kernels=True) and cannot run, naming why and the fix."""
    want = wanted(kernels)
    library = module = None
    env_off = _ENV_VALUES.get(os.environ.get(ENV, "").strip().lower()) is False
    if want and env_off:  # the library itself stays off under EDGELLM_KERNELS=0 (edgellm.kernels.library_path)
        reason, fix = f"{ENV}={os.environ[ENV]!r} turns them off", f"unset {ENV}"
    elif want is False:
        reason, fix = ("turned off (kernels=False)" if kernels is False else f"turned off ({ENV}=0)"), ""
    elif kernel_path is None:
        reason = "the folder has no kernel graph (convert writes model.kernels.onnx for int8 and int4 CPU models)"
        fix = (f"python -m edgellm.convert.kernel_graph {str(model_path.parent)!r} (an int8 CPU folder; needs "
               "edgellm[convert]), or re-convert with `edgellm convert --precision int8 --target cpu`")
    elif provider != "CPUExecutionProvider":
        reason, fix = f"edgellm's kernels run on the CPU provider only, not {provider}", "load with providers='cpu'"
    else:
        module, library, reason, fix = _library()
    if library is None or module is None:
        if want:
            how = "kernels=True" if kernels is True else f"{ENV}=1"
            raise KernelError(f"{how} asks for edgellm's CPU kernels, but they cannot run here: {reason}. Fix: "
                              f"{fix}; or load with kernels=None to run the standard graph where they cannot.")
        return GraphChoice(model_path, False, reason)
    isa = _isa(module)
    if not want and isa != MEASURED_ISA:
        return GraphChoice(model_path, False, f"edgellm's kernels run their {isa or 'unknown'} path on this CPU, and "
                           f"only the {MEASURED_ISA} one is measured faster than onnxruntime's (kernels=True runs it "
                           "anyway)", library=library, isa=isa)
    return GraphChoice(kernel_path, True, "the folder's kernel graph and this machine's kernel library",
                       library=library, isa=isa, required=bool(want))


def register(options, choice: GraphChoice) -> None:
    """Register the kernel library on onnxruntime SessionOptions (only for a choice that uses it)."""
    from .. import kernels

    if not kernels.register(options):
        raise KernelError(f"edgellm.kernels.register() could not register {choice.library} with onnxruntime. "
                          "Fix: load with kernels=None or False to run the standard graph.")


def log_once(choice: GraphChoice, model: str) -> None:
    """Say at info level which graph runs and why; each distinct reason once per process."""
    key = f"{model}|{choice.describe()}"
    if key not in _logged:
        _logged.add(key)
        logger.info("%s: decoding with %s", model, choice.describe())


__all__ = ["ENV", "GraphChoice", "wanted", "choose", "register", "log_once"]
