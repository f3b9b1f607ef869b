"""Measured latency that travels with the model: `edgellm bench --save` writes MODEL_DIR/benchmarks.json.

One entry per (device, provider, threads, decode graph); saving again on the same device replaces that entry. The
file is not part of the folder's checksums (edgellm.manifest.UNCHECKED_FILES), so saving never breaks
`verify`. An app reads it before loading the model: `edgellm.read_benchmarks(folder)`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..errors import ModelFormatError
from ..manifest import BENCHMARKS_NAME, fingerprint, read_manifest
from ..record import write_json_atomic

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class DeviceBenchmark:
    """What one run of `edgellm bench` measured for this model on one device (medians over its runs)."""

    provider: str  # onnxruntime provider, e.g. CPUExecutionProvider, CUDAExecutionProvider
    device: str  # GPU name for CUDA/TensorRT, else the CPU model
    threads: int | None  # CPU threads asked for (None: onnxruntime's default, one per core)
    ttft_ms: float
    decode_ms_per_token: float
    decode_tokens_per_s: float
    prefill_tokens_per_s: float
    prompt_tokens: int
    new_tokens: int
    runs: int
    peak_rss_mb: float
    peak_device_memory_mb: float | None  # None on the CPU, and where nvidia-smi cannot tell (Jetson)
    cpu_model: str
    machine: str  # platform.machine(): x86_64, aarch64
    date: str  # ISO 8601, UTC
    edgellm_version: str
    onnxruntime_version: str
    graph: str | None = None  # the decode graph: model.onnx, or model.kernels.onnx (edgellm's kernels); None: older
    kernel_isa: str | None = None  # the ISA edgellm's kernels ran on (model.kernels.onnx only)

    @property
    def key(self) -> tuple:
        return (self.device, self.provider, self.threads, self.graph or "model.onnx")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DeviceBenchmark":
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})


def benchmarks_path(folder: str | Path) -> Path:
    return Path(folder) / BENCHMARKS_NAME


def read_benchmarks(folder: str | Path) -> list[DeviceBenchmark]:
    """The figures saved with `edgellm bench --save`, oldest first; [] when none were saved.

    Entries measured on an earlier conversion of the folder (another manifest fingerprint) are left out.
    """
    path = benchmarks_path(folder)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
        entries = [DeviceBenchmark.from_dict(e) for e in data["results"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"{path} is not a valid benchmarks file ({exc}). Fix: delete it and run "
                               "`edgellm bench --save` again.") from exc
    if data.get("model_fingerprint") not in (None, fingerprint(folder)):
        logger.warning("%s was measured on another conversion of this folder; ignoring it", path)
        return []
    return sorted(entries, key=lambda e: e.date)


def check_writable(folder: str | Path) -> None:
    """Fail before a benchmark runs, not after, when its figures could not be saved."""
    root = Path(folder)
    read_manifest(root)
    if not os.access(root, os.W_OK):
        raise ModelFormatError(f"cannot save benchmarks: the model folder {str(root)!r} is read-only. "
                               "Fix: make it writable, or run `edgellm bench` without --save.")


def save_benchmark(folder: str | Path, entry: DeviceBenchmark) -> Path:
    """Add `entry`, replacing one of the same (device, provider, threads); atomic (temp file + rename)."""
    check_writable(folder)
    try:
        kept = [e for e in read_benchmarks(folder) if e.key != entry.key]
    except ModelFormatError:
        logger.warning("%s was unreadable; starting it afresh", benchmarks_path(folder))
        kept = []
    manifest = read_manifest(folder)
    data = {"format_version": FORMAT_VERSION, "model": manifest.name, "model_fingerprint": fingerprint(folder),
            "results": [e.to_dict() for e in kept + [entry]]}
    path = benchmarks_path(folder)
    write_json_atomic(path, data)
    return path


def format_benchmarks(entries: list[DeviceBenchmark]) -> list[str]:
    """Lines for `edgellm info`."""
    lines = []
    for e in entries:
        memory = f", device memory {e.peak_device_memory_mb:.0f} MB" if e.peak_device_memory_mb else ""
        graph = f", {e.graph}" + (f" ({e.kernel_isa})" if e.kernel_isa else "") if e.graph else ""
        lines.append(f"  {e.device} [{e.provider.replace('ExecutionProvider', '')}, threads={e.threads or 'auto'}{graph}]: "
                     f"TTFT {e.ttft_ms:.0f} ms, decode {e.decode_ms_per_token:.1f} ms/token "
                     f"({e.decode_tokens_per_s:.1f} tokens/s){memory}; {e.date[:10]}, edgellm {e.edgellm_version}, "
                     f"onnxruntime {e.onnxruntime_version}")
    return lines
