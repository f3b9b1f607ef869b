"""The one place that runs the ONNX decoder: onnxruntime session, in-place KV buffers, IO binding.

The KV cache is a fixed buffer per layer (1, kv_heads, capacity, head_dim), bound as both the
`past` input and the `present` output, so GroupQueryAttention writes new keys/values in place
and no step allocates or copies the cache. Rolling the cache back (prefix reuse, speculative
decoding) is free: only the logical length changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import ContextLengthError, ProviderError

logger = logging.getLogger(__name__)

# Batch-invariant graphs (edgellm convert --batch-invariant) give attention one padding row,
# written to cache slot T (see edgellm/convert/graph.py), so each buffer is one slot longer
# than the logical capacity. Other graphs never touch the spare slot.
SPARE_CACHE_SLOTS = 1

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """Map short names to onnxruntime providers; fail clearly if one is not in this build."""
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    available = ort.get_available_providers()
    resolved = []
    for name in providers:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise ProviderError(
                f"execution provider {name!r} is not available in this onnxruntime build "
                f"(available: {', '.join(available)}). Fix: use one of those, or install a build that has it "
                "(CUDA/TensorRT: pip install onnxruntime-gpu; on Jetson, the JetPack onnxruntime wheel)."
            )
        resolved.append(full)
    if "TensorrtExecutionProvider" in resolved and "CUDAExecutionProvider" in available \
            and "CUDAExecutionProvider" not in resolved:
        resolved.append("CUDAExecutionProvider")  # TensorRT hands unsupported nodes to CUDA, not the CPU
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


class DecoderSession:
    """Runs forward passes and owns the KV cache; knows nothing about text or sampling."""

    def __init__(self, model_path: Path, io: dict, dims: dict, capacity: int,
                 providers: Sequence[str] | str | None = None, threads: int | None = None,
                 head_tokens: np.ndarray | None = None) -> None:
        """head_tokens: for draft models whose lm_head covers only these ids (edgellm convert --draft-head);
        their logits are scattered into full-vocabulary rows whose other entries are -inf."""
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        self.providers = resolve_providers(providers)
        self.session = ort.InferenceSession(str(model_path), options, providers=self.providers)
        self.provider = self.session.get_providers()[0]
        self.io = io
        self.capacity = capacity
        self.vocab_size = int(dims["vocab_size"])
        device = "cuda" if self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        kv_shape = (1, int(dims["num_kv_heads"]), capacity + SPARE_CACHE_SLOTS, int(dims["head_dim"]))
        self.head_tokens = None if head_tokens is None else np.asarray(head_tokens, dtype=np.int64)
        head_size = self.vocab_size if self.head_tokens is None else len(self.head_tokens)
        self._binding = self.session.io_binding()
        self._logits_one = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, head_size), np.float32, "cpu", 0)
        self._full_one = np.full((1, self.vocab_size), -np.inf, dtype=np.float32)  # only head_tokens' entries change
        self._binding.bind_ortvalue_output(io["logits"], self._logits_one)  # first: get_outputs()[0] is logits
        self._kv = []
        for past, present in zip(io["past_key"] + io["past_value"], io["present_key"] + io["present_value"]):
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(kv_shape, np.float32, device, 0)
            self._binding.bind_ortvalue_input(past, buffer)
            self._binding.bind_ortvalue_output(present, buffer)
            self._kv.append(buffer)
        self._mask = np.ones((1, capacity), dtype=np.int64)
        self._keep = {}
        self.tokens: list[int] = []  # tokens whose keys/values are in the cache, in order

    @property
    def length(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        """Forget cached positions from `length` on (their buffer rows are simply overwritten later)."""
        del self.tokens[length:]

    def forward(self, token_ids: Sequence[int], keep: int = 1) -> np.ndarray:
        """Append token_ids to the cache; return logits (keep, vocab) for the last `keep` of them.

        The returned array for keep=1 is a view of a reused buffer: copy it to keep it past the next call.
        """
        count = len(token_ids)
        total = self.length + count
        if total > self.capacity:
            raise ContextLengthError(
                f"{total} tokens do not fit the KV cache of {self.capacity} tokens. "
                "Fix: shorten the prompt or lower max_new_tokens, or load with a larger context_length."
            )
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, count)
        if keep not in self._keep:
            self._keep[keep] = np.array(keep, dtype=np.int64)
        binding = self._binding
        binding.bind_cpu_input(self.io["input_ids"], ids)
        binding.bind_cpu_input(self.io["attention_mask"], self._mask[:, :total])
        binding.bind_cpu_input(self.io["num_logits_to_keep"], self._keep[keep])
        if keep == 1:
            binding.bind_ortvalue_output(self.io["logits"], self._logits_one)
        else:
            binding.bind_output(self.io["logits"], "cpu")
        self.session.run_with_iobinding(binding)
        self.tokens.extend(int(t) for t in token_ids)
        logits = self._logits_one.numpy()[0] if keep == 1 else binding.get_outputs()[0].numpy()[0]
        if self.head_tokens is None:
            return logits
        full = self._full_one if keep == 1 else np.full((keep, self.vocab_size), -np.inf, dtype=np.float32)
        full[:, self.head_tokens] = logits
        return full
