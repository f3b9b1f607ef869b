"""The kernel twin's scales as float16, stored inside model.kernels.onnx.

MatMulNBits keeps one fp32 scale per 32 int8 weights: 4 of every 36 bytes a decode step reads.
edgellm's kernels take them as fp16 (2 of 34), so SmolLM2-135M reads 143 MB per token instead of
151. fp16 holds these scales (typically 1e-5 .. 1e-1) with a relative error of at most 2^-11, far
below the int8 weights' own rounding (up to 2^-8 of a block's range); a scale fp16 cannot hold
(overflow, or one small enough to lose precision as an fp16 subnormal) stops the twin with an error instead of quietly
changing the model. The copies live in the twin's own file (8 MB for SmolLM2-135M), written with it
atomically; the weights stay in model.onnx.data, shared with model.onnx.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import ModelFormatError

DOMAIN = "ai.edgellm"
SCALE_INPUTS = {"MatMulQ8": (2,), "Q8Mlp": (3, 6, 8)}  # which inputs of edgellm's ops are block scales
SUFFIX = ".f16"
MAX_RELATIVE_ERROR = 2.0 ** -11  # fp16 rounding of a normal number; subnormals (below 6.1e-5) lose more


def halve_scales(model: onnx.ModelProto, folder: Path) -> int:
    """Point every edgellm op's scale inputs at fp16 copies embedded in `model` (its external data read from
    `folder`); drop initializers nothing uses any more. Returns how many scale tensors were converted."""
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    converted: dict[str, str] = {}
    for node in graph.node:
        if node.domain != DOMAIN:
            continue
        for index in SCALE_INPUTS.get(node.op_type, ()):
            name = node.input[index]
            if initializers.get(name) is not None and initializers[name].data_type == onnx.TensorProto.FLOAT16:
                continue  # already fp16 (an int4 twin's d and minimum): kept as they are
            if name not in converted:
                if name not in initializers:
                    raise ModelFormatError(f"{node.op_type} node '{node.name}': its scales {name!r} are not an "
                                           "initializer; the kernel twin needs constant weights. Fix: re-run "
                                           "`edgellm convert`.")
                values = numpy_helper.to_array(initializers[name], base_dir=str(folder)).astype(np.float32)
                with np.errstate(over="ignore"):  # a scale float16 cannot hold becomes inf: reported just below
                    half = values.astype(np.float16)
                with np.errstate(divide="ignore", invalid="ignore"):
                    error = np.abs(half.astype(np.float32) - values) / np.abs(values)
                lost = ~np.isfinite(half) | ((values != 0) & ~(error <= MAX_RELATIVE_ERROR))
                if lost.any():
                    raise ModelFormatError(f"scale {float(values[lost].flat[0])!r} in {name!r} does not fit float16 "
                                           f"within {MAX_RELATIVE_ERROR:.1e} (its normal range is 6.1e-5 .. 65504). "
                                           "Fix: convert with --no-kernel-graph.")
                graph.initializer.append(numpy_helper.from_array(half, name + SUFFIX))
                converted[name] = name + SUFFIX
            node.input[index] = converted[name]
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return len(converted)
