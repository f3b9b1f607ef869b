"""Torch-free runtime: onnxruntime + tokenizers + numpy only."""

from .llm import LLM, load
from .types import CancelToken, GenerationResult, GenerationTimings, SamplingParams, StreamChunk, ToolCall

__all__ = ["LLM", "load", "CancelToken", "GenerationResult", "GenerationTimings", "SamplingParams", "StreamChunk",
           "ToolCall"]
