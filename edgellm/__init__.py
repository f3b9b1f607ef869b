"""edgellm: a small chat LLM on an edge device.

`import edgellm` loads only the runtime (onnxruntime, tokenizers, numpy); the converter and its
torch/transformers stack load only inside `edgellm convert`.
"""

from .errors import (
    ConstraintError,
    ContextLengthError,
    EdgeLLMError,
    InvalidParameterError,
    KernelError,
    MissingDependencyError,
    ModelFormatError,
    ProviderError,
    ValidationError,
)
from .runtime import LLM, CancelToken, GenerationResult, GenerationTimings, SamplingParams, StreamChunk, ToolCall, load
from .runtime.benchmarks import DeviceBenchmark, read_benchmarks

__version__ = "0.1.0"

__all__ = [
    "load", "LLM", "SamplingParams", "GenerationResult", "GenerationTimings", "StreamChunk", "CancelToken", "ToolCall",
    "EdgeLLMError", "ModelFormatError", "ContextLengthError", "InvalidParameterError", "ConstraintError", "ProviderError",
    "MissingDependencyError", "KernelError", "ValidationError", "read_benchmarks", "DeviceBenchmark", "__version__",
]
