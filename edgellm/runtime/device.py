"""What this process runs on: CPU model, GPU name, device memory in use. Best effort, never raises.

Used by `edgellm bench` to label its figures (and by `bench --save`, so a model folder says what it
costs on which device). Reads /proc and nvidia-smi; no extra package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

_SMI_TIMEOUT_S = 5


def cpu_model() -> str:
    """'AMD EPYC 7B13'; on ARM boards with the board's name, e.g. 'aarch64 (Raspberry Pi 5 Model B Rev 1.0)'."""
    from ..record import machine

    name = machine().cpu_model
    board = board_model()
    return f"{name} ({board})" if board and board not in name else name


def board_model() -> str | None:
    """The device-tree model of ARM boards ('NVIDIA Jetson Orin Nano Developer Kit'); None on PCs."""
    try:
        return Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ") or None
    except OSError:
        return None


def _smi(*args: str) -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        done = subprocess.run(["nvidia-smi", *args, "--format=csv,noheader,nounits"], capture_output=True,
                              text=True, timeout=_SMI_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in done.stdout.splitlines() if line.strip()] if done.returncode == 0 else []


def gpu_name() -> str | None:
    """The first visible NVIDIA GPU ('NVIDIA GeForce RTX 4070'), or the Jetson board; None without one."""
    names = _smi("--query-gpu=name")
    if names:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        index = int(visible) if visible.isdigit() and int(visible) < len(names) else 0
        return names[index]
    board = board_model()
    return board if board and "jetson" in board.lower() else None


def process_gpu_memory_mb(pid: int | None = None) -> float | None:
    """Device memory this process holds (onnxruntime's CUDA arena keeps what it took, so at the end of a
    run this is its peak). None where nvidia-smi cannot tell, e.g. on Jetson's unified memory."""
    pid = os.getpid() if pid is None else pid
    for line in _smi("--query-compute-apps=pid,used_memory"):
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


def device_name(provider: str) -> str:
    """The device a provider runs on: the GPU for CUDA/TensorRT, else the CPU model."""
    if provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider"):
        return gpu_name() or "NVIDIA GPU (name unknown: no nvidia-smi)"
    return cpu_model()
