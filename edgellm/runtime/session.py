"""The one place that runs the ONNX decoder: onnxruntime session, in-place KV buffers, IO binding.

The KV cache is a fixed buffer per layer (1, kv_heads, capacity, head_dim), bound as both the
`past` input and the `present` output, so GroupQueryAttention writes new keys/values in place
and no step allocates or copies the cache. Rolling the cache back (prefix reuse, speculative
decoding) is free: only the logical length changes.

On CUDA/TensorRT the cache buffers live in device memory (the graph's KV dtype: fp16 for folders
converted --target cuda), so a step copies only the token ids in and the kept logits out (one row
for decode); nothing of the cache crosses to the host.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..contract import GraphOptions, IONames, ModelDims, check_session
from ..errors import ContextLengthError, KernelError, ModelFormatError, ProviderError
from . import kernel_choice

logger = logging.getLogger(__name__)

# What onnxruntime raises for a model it cannot load (its pybind errors derive from Exception directly).
_ORT_LOAD_ERRORS = (RuntimeError, ValueError, OSError) + tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name) for name in
    ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NotFound", "NotImplemented",
     "RuntimeException", "NoModel") if hasattr(ort.capi.onnxruntime_pybind11_state, name))

GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
KV_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}  # ONNX input type -> buffer dtype
TRT_CACHE = Path(".cache") / "trt"  # inside the model folder; not in its checksums (edgellm.manifest)
# Calls with at least this many new tokens run on the folder's prefill graph, if it has one (convert
# --prefill-graph); fewer (decode steps, speculative verify passes of up to 7) stay on the decode graph.
PREFILL_GRAPH_MIN_TOKENS = 8

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
    if not isinstance(providers, (list, tuple)) or not providers or not all(isinstance(p, str) for p in providers):
        raise ProviderError(f"providers={providers!r:.60} must be a name like 'cpu', 'cuda' or 'tensorrt', or a "
                            "non-empty list of them in order of preference. Fix: pass e.g. providers='cpu'.")
    available = ort.get_available_providers()
    resolved = []
    for name in providers:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        if full not in available:
            raise ProviderError(
                f"execution provider {name!r} is not available in this onnxruntime build "
                f"(available: {', '.join(available)}). Fix: use one of those, or install a build that has it "
                "(CUDA/TensorRT: pip uninstall onnxruntime, then pip install onnxruntime-gpu; on a Jetson, the "
                "onnxruntime-gpu wheel for its JetPack from NVIDIA's Jetson AI Lab index: README \"Jetson\")."
            )
        resolved.append(full)
    if "TensorrtExecutionProvider" in resolved and "CUDAExecutionProvider" in available \
            and "CUDAExecutionProvider" not in resolved:
        resolved.append("CUDAExecutionProvider")  # TensorRT hands unsupported nodes to CUDA, not the CPU
    if "CPUExecutionProvider" not in resolved:
        resolved.append("CPUExecutionProvider")
    return resolved


def trt_cache_dir(model_path: Path) -> Path:
    """Where TensorRT engines for this model are kept: MODEL_DIR/.cache/trt, or, when the model folder is
    read-only, the user cache (XDG_CACHE_HOME or ~/.cache)/edgellm/trt/<folder name>-<path hash>."""
    folder = Path(model_path).resolve().parent
    local = folder / TRT_CACHE
    try:
        local.mkdir(parents=True, exist_ok=True)
        if os.access(local, os.W_OK):
            return local
    except OSError:
        pass
    import hashlib

    tag = hashlib.sha256(str(folder).encode()).hexdigest()[:12]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgellm" / "trt" / f"{folder.name}-{tag}"
    user.mkdir(parents=True, exist_ok=True)
    return user


def _provider_options(providers: list[str], model_path: Path) -> list:
    """TensorRT gets an engine cache (building engines takes minutes; a cached engine loads in seconds)."""
    entries: list = []
    for name in providers:
        if name != "TensorrtExecutionProvider":
            entries.append(name)
            continue
        cache = trt_cache_dir(model_path)
        if not any(cache.glob("*.engine")):
            logger.warning("building TensorRT engines into %s: the first run takes minutes (later runs load them "
                           "from there in seconds)", cache)
        entries.append((name, {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                               "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True,
                               "trt_timing_cache_path": str(cache)}))
    return entries


def _session_options(threads: int | None, spin_after_run: bool = True) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    if not spin_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def _open(model_path: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(model_path), options, providers=providers)
    except _ORT_LOAD_ERRORS as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ModelFormatError(f"onnxruntime cannot load {model_path} ({reason}). Fix: re-run `edgellm convert` "
                               "(a truncated, damaged or foreign model file, or weights outside the folder).") from exc


def _damaged(exc: Exception) -> bool:
    """onnxruntime could not read the file itself (truncated, not a model, missing), as opposed to refusing a node."""
    damage = tuple(getattr(ort.capi.onnxruntime_pybind11_state, name) for name in ("InvalidProtobuf", "NoSuchFile")
                   if hasattr(ort.capi.onnxruntime_pybind11_state, name)) + (OSError,)
    return isinstance(exc.__cause__, damage)


class DecoderSession:
    """Runs forward passes and owns the KV cache; knows nothing about text or sampling."""

    def __init__(self, model_path: Path, io: IONames | dict, dims: ModelDims | dict, capacity: int,
                 providers: Sequence[str] | str | None = None, threads: int | None = None,
                 head_tokens: np.ndarray | None = None, graph: GraphOptions | dict | None = None,
                 prefill_path: Path | None = None, kernel_path: Path | None = None,
                 kernels: bool | None = False, spin_after_run: bool = True) -> None:
        """io, dims, graph: the manifest's contract (edgellm.contract; dicts are read with from_dict).
        graph.attention_pad_rows: cache slots past `capacity` the graph writes (batch-invariant graphs: 1);
        None means unknown, and one spare slot is kept, which is safe for every graph edgellm builds.
        graph.kv_dtype: what the cache holds (float16 for --target cuda), checked against the graph's inputs;
        None: read from the graph.
        head_tokens: for draft models whose lm_head covers only these ids (edgellm convert --draft-head);
        their logits are scattered into full-vocabulary rows whose other entries are -inf.
        prefill_path: the folder's prefill graph (convert --prefill-graph): same inputs and outputs, run for calls
        of PREFILL_GRAPH_MIN_TOKENS tokens or more, on the same KV buffers (CPU only).
        kernel_path: the folder's kernel twin of model_path (model.kernels.onnx); kernels: None (load()'s default)
        runs it where edgellm's kernel library can (CPU), True requires it (KernelError naming why not), False
        (the default here: convert's own sessions) never (edgellm.runtime.kernel_choice). `self.choice` says which
        graph runs and why.
        spin_after_run: onnxruntime's worker threads spin a while after each run, ready for the next step; False
        stops them at once (a draft model, whose spinning threads take the cores from the model it drafts for).
        Raises ModelFormatError when the graph's inputs/outputs disagree with io, dims or the KV dtype."""
        dims = dims if isinstance(dims, ModelDims) else ModelDims.from_dict(dims)
        io = io if isinstance(io, IONames) else IONames.from_dict(io, dims.num_layers)
        if isinstance(graph, dict):
            graph = GraphOptions.from_dict(graph)
        spare = 1 if graph is None else graph.attention_pad_rows
        self.providers = resolve_providers(providers)
        if self.providers[0] in GPU_PROVIDERS and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from pip's nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]), if there
        self.choice = kernel_choice.choose(Path(model_path), kernel_path, self.providers[0], kernels)
        self.session = self._open_decoder(Path(model_path), threads, spin_after_run)
        model_path = self.choice.path
        self.provider = self.session.get_providers()[0]
        if self.providers[0] in GPU_PROVIDERS and self.provider != self.providers[0]:
            raise ProviderError(
                f"onnxruntime has {self.providers[0]} but could not start it (see its log above: usually the CUDA 12 "
                "or cuDNN 9 libraries are missing or a driver is too old). Fix: pip install "
                "'onnxruntime-gpu[cuda,cudnn]' (a Jetson: JetPack's CUDA with the Jetson AI Lab wheel; README "
                "\"Jetson\"), or run on the CPU (providers=\"cpu\").")
        self.io, self.dims, self.graph = io, dims, graph
        self.capacity = capacity
        self.vocab_size = dims.vocab_size
        self.device = "cuda" if self.provider in GPU_PROVIDERS else "cpu"
        self.head_tokens = None if head_tokens is None else np.asarray(head_tokens, dtype=np.int64)
        head_size = self.vocab_size if self.head_tokens is None else len(self.head_tokens)
        check_session(self.session.get_inputs(), self.session.get_outputs(), io, dims,
                      None if self.head_tokens is None else head_size, model=str(model_path))
        self.kv_dtype = self._cache_dtype(model_path, None if graph is None else graph.kv_dtype)
        kv_shape = (1, dims.num_kv_heads, capacity + spare, dims.head_dim)
        self._binding = self.session.io_binding()
        self._logits_one = ort.OrtValue.ortvalue_from_shape_and_type((1, 1, head_size), np.float32, "cpu", 0)
        self._full_one = np.full((1, self.vocab_size), -np.inf, dtype=np.float32)  # only head_tokens' entries change
        self._binding.bind_ortvalue_output(io.logits, self._logits_one)  # first: get_outputs()[0] is logits
        self._kv = []
        for past, present in io.kv_pairs:
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(kv_shape, self.kv_dtype, self.device, 0)
            self._binding.bind_ortvalue_input(past, buffer)
            self._binding.bind_ortvalue_output(present, buffer)
            self._kv.append(buffer)
        self.prefill_session = self._prefill_binding = None
        self.prefill_min_tokens = PREFILL_GRAPH_MIN_TOKENS  # calls this long or longer take the prefill graph
        if prefill_path is not None:
            if self.device != "cpu":
                raise ModelFormatError(f"{prefill_path} is a CPU prefill graph; this session runs on {self.provider}. "
                                       "Fix: run on the CPU, or convert without --prefill-graph for the GPU.")
            # Its worker threads stop spinning when a prompt is done, so they leave the cores to the decode steps.
            self.prefill_session = _open(prefill_path, _session_options(threads, spin_after_run=False),
                                         ["CPUExecutionProvider"])
            check_session(self.prefill_session.get_inputs(), self.prefill_session.get_outputs(), io, dims,
                          None if self.head_tokens is None else head_size, model=str(prefill_path))
            self._prefill_binding = self.prefill_session.io_binding()
            self._prefill_binding.bind_ortvalue_output(io.logits, self._logits_one)
            for (past, present), buffer in zip(io.kv_pairs, self._kv):  # the one cache, written by both graphs
                self._prefill_binding.bind_ortvalue_input(past, buffer)
                self._prefill_binding.bind_ortvalue_output(present, buffer)
        self._mask = np.ones((1, capacity), dtype=np.int64)
        self._keep = {}
        self.tokens: list[int] = []  # tokens whose keys/values are in the cache, in order

    def _open_decoder(self, model_path: Path, threads: int | None, spin_after_run: bool) -> ort.InferenceSession:
        """model_path, or its kernel twin with edgellm's kernel library registered (self.choice). A twin that
        cannot be registered or whose nodes onnxruntime refuses falls back to model_path with a warning, unless
        kernels were required; a twin file that cannot be read is a ModelFormatError, as for model.onnx."""
        providers = _provider_options(self.providers, model_path)
        if self.choice.kernels:
            options = _session_options(threads, spin_after_run)
            try:
                kernel_choice.register(options, self.choice)
                session = _open(self.choice.path, options, providers)
            except (KernelError, ModelFormatError) as exc:
                if self.choice.required or _damaged(exc):
                    raise  # a damaged twin is reported as a damaged model.onnx would be, not run around
                logger.warning("running %s instead of its kernel graph: %s", model_path.name, exc)
                self.choice = self.choice.fallback(model_path, f"the kernel graph failed to load ({exc})")
            else:
                kernel_choice.log_once(self.choice, str(model_path.parent))
                return session
        kernel_choice.log_once(self.choice, str(model_path.parent))
        return _open(model_path, _session_options(threads, spin_after_run), providers)

    def _cache_dtype(self, model_path: Path, expected: str | None) -> type:
        types = {i.name: i.type for i in self.session.get_inputs()}
        past = self.io.past_key[0]
        graph_type = types.get(past)
        if graph_type not in KV_DTYPES:
            raise ModelFormatError(f"{model_path}: KV input {past!r} has type {graph_type}; edgellm runs float32 or "
                                   "float16 caches. Fix: re-run `edgellm convert`.")
        dtype = KV_DTYPES[graph_type]
        if expected is not None and np.dtype(expected) != np.dtype(dtype):
            raise ModelFormatError(f"{model_path}: the manifest says the KV cache is {expected}, the graph takes "
                                   f"{np.dtype(dtype).name}. Fix: re-run `edgellm convert` (the folder is mixed up).")
        return dtype

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
        session, binding = self.session, self._binding
        if self._prefill_binding is not None and count >= self.prefill_min_tokens:
            session, binding = self.prefill_session, self._prefill_binding
        binding.bind_cpu_input(self.io.input_ids, ids)
        binding.bind_cpu_input(self.io.attention_mask, self._mask[:, :total])
        binding.bind_cpu_input(self.io.num_logits_to_keep, self._keep[keep])
        if keep == 1:
            binding.bind_ortvalue_output(self.io.logits, self._logits_one)
        else:
            binding.bind_output(self.io.logits, "cpu")
        session.run_with_iobinding(binding)
        self.tokens.extend(int(t) for t in token_ids)
        logits = self._logits_one.numpy()[0] if keep == 1 else binding.get_outputs()[0].numpy()[0]
        if self.head_tokens is None:
            return logits
        full = self._full_one if keep == 1 else np.full((keep, self.vocab_size), -np.inf, dtype=np.float32)
        full[:, self.head_tokens] = logits
        return full
