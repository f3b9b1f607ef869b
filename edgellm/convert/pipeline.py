"""`edgellm convert`: source → fp32 ONNX with KV cache → int8 → validation gate → model folder.

The folder is built under a hidden temporary name beside OUT and renamed into place only after
the gate passed and the manifest (with checksums) is written: an interrupted or failed convert
never leaves a folder at OUT that loads.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import InvalidParameterError, UnsupportedArchitectureError
from ..manifest import GenerationDefaults, Manifest
from ..runtime import measure
from ..runtime.session import PREFILL_GRAPH_MIN_TOKENS, DecoderSession
from ..validation import INT4_KERNEL_THRESHOLDS, DraftHead, HeldOut, KernelCheck, PerplexityScore, ValidationReport
from . import draft_head, output, validate
from ..contract import GraphOptions
from .graph import DecoderDims, build_decoder, io_names, save_model
from .sources import LoadedModel, ResolvedSource, load_source, resolve_source

logger = logging.getLogger(__name__)

PRECISIONS = ("int8", "int4", "fp32", "fp16")
# What each target's graph can hold. cpu: fp32 activations, int8 MatMulNBits (MLAS int8 kernels) or fp32.
# cuda: fp16 activations and KV cache (onnxruntime's CUDA GroupQueryAttention has fp16/bf16 kernels only),
# weights int8 MatMulNBits (CUDA kernels for 4 and 8 bits) or dense fp16. See README "NVIDIA GPUs and Jetson".
TARGET_PRECISIONS = {"cpu": ("int8", "int4", "fp32"), "cuda": ("int8", "fp16")}  # int4: mixed 4/8-bit
TARGETS = tuple(TARGET_PRECISIONS)


def _source_revision(package: Path | None = None) -> str:
    """A hash of the code and data that decide what convert writes (this package, the contract/manifest/report
    modules, the measurement helpers the gate uses, the calibration and held-out texts), so a cached
    conversion is known stale when any of them changes, with no constant to remember to bump."""
    package = package or Path(__file__).resolve().parent.parent
    files = sorted(package.glob("convert/*.py")) + sorted(package.glob("data/*.txt")) + [
        package / "contract.py", package / "manifest.py", package / "validation.py", package / "runtime" / "measure.py"]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


CONVERTER_REVISION = _source_revision()
HELDOUT_TEXT = Path(__file__).resolve().parent.parent / "data" / "heldout_en.txt"
SPEED_PROMPT = [{"role": "user", "content": "What is the capital of France?"}]
PREFILL_MODEL = "prefill.onnx"  # --prefill-graph (edgellm/convert/prefill.py)


@dataclass(frozen=True)
class ConvertOptions:
    precision: str = "int8"
    target: str = "cpu"  # cpu | cuda (onnxruntime's CUDA and TensorRT providers, desktop GPUs and Jetson)
    force: bool = False
    gate: bool = True
    keep_fp32: bool = False
    block_size: int = 32
    smooth_alpha: float | None = 0.5  # SmoothQuant migration strength for int8; None or 0 turns it off
    threads: int | None = None
    batch_invariant: bool = False  # logits independent of how tokens are batched (see graph.py); costs 3-20% decode
    draft_head: int | None = None  # a draft-only model: lm_head over the N most frequent chat tokens (draft_head.py)
    int4_edge_blocks: int = 2      # int4: first and last N blocks stay 8-bit (with the lm_head/embedding)
    int4_int8_projections: tuple[str, ...] = ("down_proj",)  # int4: these projections stay 8-bit in every block
    prefill_graph: bool = False    # int8 CPU: also write prefill.onnx, QGEMM for prompts (edgellm/convert/prefill.py)
    kernel_graph: bool = True      # int8 CPU: also write model.kernels.onnx, edgellm's kernels (kernel_graph.py)
    head_bits: int = 8             # int8 CPU, tied embedding: 4 = a 4-bit lm_head whose top logits are rescored in int8
    progress: bool = True
    validation: validate.ValidationSettings = field(default_factory=validate.ValidationSettings)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise InvalidParameterError(f"precision={self.precision!r} is not one of {', '.join(PRECISIONS)}.")
        if self.target not in TARGETS:
            raise InvalidParameterError(f"target={self.target!r} is not one of {', '.join(TARGETS)}.")
        allowed = TARGET_PRECISIONS[self.target]
        if self.precision not in allowed:
            other = next(t for t, p in TARGET_PRECISIONS.items() if self.precision in p)
            why = (" (onnxruntime's CUDA GroupQueryAttention has fp16 kernels only)" if self.target == "cuda"
                   else " (fp16 runs slower than fp32 on CPUs: it is the GPU graph)")
            raise InvalidParameterError(f"precision {self.precision} cannot be built for target {self.target}{why}. "
                                        f"Fix: use --precision {' or '.join(allowed)} with --target {self.target}, "
                                        f"or --target {other} for {self.precision}.")
        if self.target == "cuda" and (self.batch_invariant or self.draft_head):
            flag = "--batch-invariant" if self.batch_invariant else "--draft-head"
            raise InvalidParameterError(f"{flag} is built and measured for the CPU graph only, not for target "
                                        f"cuda. Fix: drop {flag}, or use --target cpu.")
        if self.prefill_graph and (self.precision != "int8" or self.target != "cpu" or self.batch_invariant
                                   or self.draft_head):
            raise InvalidParameterError("--prefill-graph is built for int8 CPU models (not int4, fp32, --target cuda, "
                                        "--batch-invariant or --draft-head). Fix: drop --prefill-graph, or use "
                                        "--precision int8 --target cpu without the others.")
        if self.head_bits not in (4, 8):
            raise InvalidParameterError(f"head_bits={self.head_bits} is not 8 or 4. Fix: use --head-bits 8 (the "
                                        "default) or 4.")
        if self.head_bits == 4 and (self.precision != "int8" or self.target != "cpu" or self.batch_invariant
                                    or self.draft_head):
            raise InvalidParameterError("--head-bits 4 is built and measured for int8 CPU models only (not int4, fp32, "
                                        "--target cuda, --batch-invariant or --draft-head). Fix: drop --head-bits, or "
                                        "use --precision int8 --target cpu without the others.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InvalidParameterError(f"block_size={self.block_size} must be a power of two >= 16.")
        if self.draft_head is not None and self.draft_head < 256:
            raise InvalidParameterError(f"draft_head={self.draft_head} is too small to draft with: it must be at "
                                        "least 256 (8192 keeps ~96% of what the default model says).")
        if self.int4_edge_blocks < 0:
            raise InvalidParameterError(f"int4_edge_blocks={self.int4_edge_blocks} must be 0 or more.")
        bad = [p for p in self.int4_int8_projections if p not in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")]
        if bad:
            raise InvalidParameterError(f"int4_int8_projections {bad} are not projections; use qkv_proj, o_proj, "
                                        "gate_up_proj or down_proj.")
        if self.smooth_alpha is not None and not 0 <= self.smooth_alpha <= 1:
            raise InvalidParameterError(f"smooth_alpha={self.smooth_alpha} must be in [0, 1] (0 = off).")


@dataclass
class ConvertResult:
    out_dir: Path
    manifest: Manifest
    seconds: float


class _Steps:
    """A step-level progress bar (tqdm) that also logs each step."""

    def __init__(self, names: list[str], enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc="convert", unit="step", disable=not enabled, leave=False)
        self.started = time.perf_counter()

    def step(self, name: str) -> None:
        logger.info("convert: %s", name)
        self.bar.set_description(f"convert: {name}")

    def done(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def _quiet_library_bars(quiet: bool):
    """--quiet also silences transformers' bars, including the GGUF loader's plain tqdm, which
    transformers' own disable_progress_bar() does not reach."""
    if not quiet:
        yield
        return
    import functools

    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    bar = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        if was_enabled:  # leave the caller's own setting as it was
            hf_logging.enable_progress_bar()


def decoder_dims(loaded: LoadedModel) -> tuple[DecoderDims, np.ndarray, float]:
    config = loaded.model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UnsupportedArchitectureError("this Llama variant has attention or MLP biases, which the exporter "
                                           "does not build yet. Fix: use a bias-free Llama model.")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"activation {config.hidden_act!r} is not supported (only silu).")
    heads = config.num_attention_heads
    dims = DecoderDims(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=float(config.rms_norm_eps), max_positions=int(config.max_position_embeddings),
    )
    rotary = loaded.model.model.rotary_emb
    return dims, rotary.inv_freq.detach().cpu().numpy(), float(getattr(rotary, "attention_scaling", 1.0))


def _tool_versions() -> dict:
    versions = {"python": platform.python_version(), "converter_revision": CONVERTER_REVISION}
    for package in ("edgellm", "onnxruntime", "onnx", "tokenizers", "torch", "transformers", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def convert(source: str, out_dir: str | Path, options: ConvertOptions | None = None) -> ConvertResult:
    options = options or ConvertOptions()
    out_dir = Path(out_dir).expanduser().absolute()
    started = time.perf_counter()
    # -o is checked (and its staging folder made) first; then the source; only then the slow work.
    # The staging folder goes away on any exit this process sees (see output.py).
    with output.staging_folder(out_dir, options.force) as staging:
        resolved = resolve_source(source)
        steps = _Steps(["load", "export", "quantize", "validate", "write"], options.progress)
        try:
            manifest = _build(resolved, staging, options, steps)
            steps.step("write")
            manifest.created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            manifest.record_checksums(staging)
            manifest.write(staging)  # written last: a folder without it never loads
            output.publish(staging, out_dir)
            steps.done()
        finally:
            steps.close()
    return ConvertResult(out_dir, manifest, time.perf_counter() - started)


def _build(resolved: ResolvedSource, staging: Path, options: ConvertOptions, steps: _Steps) -> Manifest:
    steps.step(f"load {resolved.kind} {resolved.name}")
    with _quiet_library_bars(not options.progress):
        loaded = load_source(resolved)
    dims, inv_freq, rope_scaling = decoder_dims(loaded)
    state = {k: v.detach().cpu().float().numpy() for k, v in loaded.model.state_dict().items()}
    smoothing = None
    gpu = options.target == "cuda"
    activation = "float16" if gpu else "float32"
    # SmoothQuant helps int8 *activations* (CPU accuracy_level 4); the GPU graph keeps fp16 activations.
    if options.precision == "int8" and options.smooth_alpha and not gpu:
        from .smooth import activation_maxima, smooth_state_dict

        smooth_state_dict(state, activation_maxima(loaded.model, loaded.hf_tokenizer), dims, options.smooth_alpha)
        smoothing = {"method": "SmoothQuant (scales folded into norms, up_proj and v_proj)",
                     "alpha": options.smooth_alpha, "calibration": "calibration_en.txt + 8 chat prompts"}
    steps.done()

    steps.step("export fp32 ONNX with KV cache")
    model_path = staging / "model.onnx"
    fp32_dir = staging if options.precision == "fp32" else staging / "reference"  # inside staging: cleaned on failure
    fp32_dir.mkdir(exist_ok=True)
    fp32_path = fp32_dir / "model.onnx"
    save_model(build_decoder(dims, state, inv_freq, rope_scaling, options.batch_invariant), str(fp32_path))
    gpu_model = build_decoder(dims, state, inv_freq, rope_scaling, activation_dtype=activation) if gpu else None
    del state
    steps.done()

    try:
        steps.step(f"quantize ({options.precision})")
        quantization: dict = {"scheme": "none"}
        kernel_info = None
        if options.precision == "int4":
            import onnx

            from .quantize import ACCURACY_LEVEL, bits_by_layer, int8_keeps, quantize_int4

            keep = int8_keeps(dims.num_layers, options.int4_edge_blocks, tuple(options.int4_int8_projections))
            tied = bool(getattr(loaded.model.config, "tie_word_embeddings", False))
            quantized = quantize_int4(onnx.load(str(fp32_path)), keep, tied=tied)
            retied = any(n.op_type == "GatherBlockQuantized" for n in quantized.graph.node)
            bits = bits_by_layer(quantized)
            save_model(quantized, str(model_path))
            del quantized
            if _wants_kernel_graph(options):
                from . import kernel_graph

                four_bit = kernel_graph.four_bit_matrices(onnx.load(str(fp32_path)), bits)
                kernel_info = kernel_graph.write(staging, four_bit=four_bit).describe()
                del four_bit
            quantization = {"scheme": "weight-only block-wise mixed 4/8-bit (onnxruntime MatMulNBits)", "bits": 4,
                            "method": "round-to-nearest, uint4 zero points", "block_size": 32, "symmetric": False,
                            "int8_rule": {"edge_blocks": options.int4_edge_blocks,
                                          "projections": list(options.int4_int8_projections)},
                            "accuracy_level": ACCURACY_LEVEL, "int8_layers": sorted(n for n, b in bits.items() if b == 8),
                            "layers_4bit": sum(b == 4 for b in bits.values()),
                            "layers_8bit": sum(b == 8 for b in bits.values()), "activations": activation,
                            "embedding": "GatherBlockQuantized over the int8 lm_head (tied, stored once)" if retied
                            else "fp32 table (the source does not tie it to the lm_head)",
                            "smoothing": None}
        elif options.precision == "int8":
            import onnx

            from .quantize import (ACCURACY_LEVEL, HEAD_BLOCK_SIZE, HEAD_METHOD, HEAD_RESCORE_TOP_K, lm_head_weight,
                                   quantize_int8, quantize_lm_head, rescore_lm_head_top_k)

            # accuracy_level 4 on the GPU graph too: CUDA's MatMulNBits ignores it (fp16 x int8 weights there);
            # on the CPU provider (this gate, CPU-only installs) it is the int8 path, 24x faster per token than
            # fp32 math over fp16 inputs, and rounds more than CUDA does, so the gate errs on the safe side.
            source_model = gpu_model if gpu else onnx.load(str(fp32_path))
            tied = bool(getattr(loaded.model.config, "tie_word_embeddings", False))
            head_weight = lm_head_weight(source_model) if options.head_bits == 4 else None
            quantized = quantize_int8(source_model, options.block_size, tied=tied)
            retied = any(n.op_type == "GatherBlockQuantized" for n in quantized.graph.node)
            if head_weight is not None:
                if not retied:
                    raise InvalidParameterError(
                        "--head-bits 4 rescores the top logits from the int8 embedding table the lm_head is tied "
                        f"to, and {resolved.name} does not tie its embedding to its lm_head. Fix: drop --head-bits.")
                quantize_lm_head(quantized, head_weight, 4, HEAD_BLOCK_SIZE, HEAD_METHOD)
                rescore_lm_head_top_k(quantized, HEAD_RESCORE_TOP_K)
                del head_weight
            prefill_model = None
            if options.prefill_graph:  # before saving: save_model moves the weights out of `quantized`
                from .prefill import build_prefill_graph

                # Weights from a fresh fp32 graph (the quantizer rewrote source_model's MatMuls in place).
                prefill_model = build_prefill_graph(quantized, onnx.load(str(fp32_path)))
            save_model(quantized, str(model_path))
            if prefill_model is not None:
                save_model(prefill_model, str(staging / PREFILL_MODEL))
            del quantized, source_model, prefill_model
            if _wants_kernel_graph(options):
                from . import kernel_graph

                kernel_info = kernel_graph.write(staging).describe()
            quantization = {"scheme": "weight-only block-wise int8 (onnxruntime MatMulNBits)", "bits": 8,
                            "block_size": options.block_size, "symmetric": True, "accuracy_level": ACCURACY_LEVEL,
                            "activations": activation,
                            "embedding": "GatherBlockQuantized over the int8 lm_head (tied, stored once)" if retied
                            else "separate Gather table (the source does not tie it to the lm_head)",
                            "smoothing": smoothing}
            if options.head_bits == 4:
                quantization["lm_head"] = {
                    "bits": 4, "block_size": HEAD_BLOCK_SIZE, "method": HEAD_METHOD, "symmetric": False,
                    "accuracy_level": ACCURACY_LEVEL, "rescore_top_k": HEAD_RESCORE_TOP_K,
                    "scheme": f"4-bit MatMulNBits over the whole vocabulary; the {HEAD_RESCORE_TOP_K} largest logits "
                              "of each position recomputed from the int8 embedding rows, the next "
                              f"{HEAD_RESCORE_TOP_K} blended from int8 to 4-bit (edgellm.convert.quantize."
                              "rescore_lm_head_top_k); see benchmarks/head_bits.json"}
            if options.prefill_graph:
                quantization["prefill_graph"] = {
                    "file": PREFILL_MODEL, "min_tokens": PREFILL_GRAPH_MIN_TOKENS,
                    "scheme": "layer MatMuls as MatMulIntegerToFloat (MLAS QGEMM): per-channel symmetric int8 "
                              "weights from fp32, per-row symmetric int8 activations; lm_head as in model.onnx"}
        elif options.precision == "fp16":
            save_model(gpu_model, str(model_path))
            quantization = {"scheme": "none (dense fp16 weights)", "activations": activation}
        del gpu_model
        steps.done()

        (staging / "tokenizer.json").write_text(loaded.tokenizer_json)
        files = {"model": "model.onnx", "weights": "model.onnx.data", "tokenizer": "tokenizer.json"}
        if options.prefill_graph:
            files.update(prefill_model=PREFILL_MODEL, prefill_weights=PREFILL_MODEL + ".data")
        if kernel_info is not None:
            files["kernel_model"] = kernel_info["file"]  # its weights: model.onnx.data, listed above
            if kernel_info.get("four_bit_file"):
                files["kernel_weights"] = kernel_info["four_bit_file"]
        if loaded.chat_template:
            (staging / "chat_template.jinja").write_text(loaded.chat_template)
            files["chat_template"] = "chat_template.jinja"

        steps.step("validate")
        report = _validate(loaded, dims, fp32_path, model_path, options)
        if options.draft_head:
            head, token_ids = _restrict_head(resolved, loaded, dims, model_path, staging, options)
            report = replace(report, draft_head=head)
            files["head_tokens"] = draft_head.HEAD_TOKENS_FILE
            if kernel_info is not None:
                kernel_info, checked = _restrict_kernel_graph(loaded, dims, model_path, staging, options, token_ids,
                                                              report.kernel_graph)
                report = replace(report, kernel_graph=checked)
        steps.done()
    finally:
        if fp32_dir != staging and not options.keep_fp32:
            shutil.rmtree(fp32_dir, ignore_errors=True)

    report = validate.judge(report, options.validation, enforced=options.gate)  # every precision, fp32 included
    if kernel_info is not None:
        report = _keep_kernel_graph(report, kernel_info, files, staging, options.gate)
        quantization["kernel_graph"] = kernel_info
    config = loaded.model.config
    return Manifest(
        name=resolved.name, architecture="llama", precision=options.precision, dims=dims,
        io=io_names(dims.num_layers), files=files,
        graph=GraphOptions.for_build(options.batch_invariant, files.get("head_tokens"), target=options.target),
        generation=GenerationDefaults(eos_token_ids=loaded.eos_token_ids, bos_token_id=loaded.bos_token_id,
                                      context_length=int(config.max_position_embeddings)),
        special_tokens={"template_vars": loaded.special_tokens, "add_bos_token": loaded.add_bos_token},
        quantization=quantization, source=resolved.describe(), validation=report, tools=_tool_versions(),
    )


def _wants_kernel_graph(options: ConvertOptions) -> bool:
    """The kernel twin is written for int8 and int4 CPU graphs (not batch-invariant ones, whose bit-exactness
    edgellm's kernels do not promise). An int8 --draft-head folder's is checked with the whole head, then rebuilt
    from the restricted graph (_restrict_kernel_graph); an int4 one's would need its 4-bit blocks again."""
    return (options.kernel_graph and options.precision in ("int8", "int4") and options.target == "cpu"
            and not options.batch_invariant and not (options.draft_head and options.precision == "int4"))


def _keep_kernel_graph(report: ValidationReport, info: dict, files: dict, staging: Path,
                       enforced: bool) -> ValidationReport:
    """Keep the twin if it passed its check, was not checked (no kernel library here), or the gate is off;
    otherwise remove it (the folder runs model.onnx) and say why. Fills info (quantization.kernel_graph)."""
    from .kernel_graph import KERNEL_MODEL

    checked = report.kernel_graph
    info["checked"] = checked is not None
    if checked is None:
        return report
    kept = checked.passed or not enforced
    if not kept:
        (staging / KERNEL_MODEL).unlink(missing_ok=True)
        if files.pop("kernel_weights", None):
            (staging / info["four_bit_file"]).unlink(missing_ok=True)
        files.pop("kernel_model", None)
        info["written"] = False
        logger.warning("the kernel graph failed its check and was not written (the folder runs model.onnx): %s",
                       "; ".join(checked.failures))
    return replace(report, kernel_graph=replace(checked, kept=kept))


def _validate(loaded: LoadedModel, dims: DecoderDims, fp32_path: Path, model_path: Path,
              options: ConvertOptions) -> ValidationReport:
    import torch
    from tokenizers import Tokenizer

    settings = options.validation
    text = HELDOUT_TEXT.read_text()
    tokenizer = Tokenizer.from_str(loaded.tokenizer_json)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    reference_ids = loaded.hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    tokens = ids[:settings.heldout_tokens + 1]
    io = io_names(dims.num_layers)
    capacity = max(settings.window, settings.consistency_tokens, 64) + 64
    candidate = None if options.precision == "fp32" else options.precision  # the graph judged against fp32
    reference_graph = GraphOptions.for_build(options.batch_invariant)
    sessions = {"fp32": DecoderSession(fp32_path, io, dims, capacity, threads=options.threads, graph=reference_graph)}
    prefill_path = model_path.with_name(PREFILL_MODEL) if options.prefill_graph else None
    if candidate:
        # With a prefill graph, perplexity and chat agreement (many tokens per call) are measured through it, the
        # decode probe and the KV check's token-by-token half through model.onnx: as the runtime runs them.
        sessions[candidate] = DecoderSession(model_path, io, dims, capacity, threads=options.threads,
                                             graph=GraphOptions.for_build(options.batch_invariant,
                                                                          target=options.target),
                                             prefill_path=prefill_path)

    sample = tokens[:64]
    with torch.no_grad():
        source_logits = loaded.model(torch.tensor([sample])).logits[0].numpy()
    onnx_logits = sessions["fp32"].forward(sample, keep=len(sample)).copy()
    sessions["fp32"].truncate(0)
    source_max_abs_diff = float(np.abs(source_logits - onnx_logits).max())

    scores = {name: measure.perplexity(s, tokens, settings.window) for name, s in sessions.items()}
    kv = {name: measure.kv_consistency(s, tokens[:settings.consistency_tokens]) for name, s in sessions.items()
          if s.prefill_session is None}
    if candidate and prefill_path is not None:  # each graph's own cache handling: one pass vs step by step
        graphs = sessions[candidate]
        for name, min_tokens in ((candidate, 10**9), (f"{candidate}_prefill_graph", 1)):
            graphs.prefill_min_tokens = min_tokens
            kv[name] = measure.kv_consistency(graphs, tokens[:settings.consistency_tokens])
        graphs.prefill_min_tokens = PREFILL_GRAPH_MIN_TOKENS
    chat = None
    if candidate and loaded.chat_template:
        chats = _chat_prompt_ids(loaded, tokenizer)
        chat = validate.chat_agreement(sessions["fp32"], sessions[candidate], chats, set(loaded.eos_token_ids))
    prompt = tokenizer.encode(_speed_prompt(loaded), add_special_tokens=False).ids
    speed = {name: measure.decode_probe(s, prompt) for name, s in sessions.items()}
    kernel = None
    if candidate and _wants_kernel_graph(options):
        from . import kernel_graph

        reason = kernel_graph.library_reason()
        if reason is None:
            graph = GraphOptions.for_build(False, target=options.target)
            standard = sessions[candidate] if prefill_path is None else DecoderSession(
                model_path, io, dims, capacity, threads=options.threads, graph=graph)
            twin = DecoderSession(model_path, io, dims, capacity, threads=options.threads, graph=graph,
                                  kernel_path=model_path.with_name(kernel_graph.KERNEL_MODEL), kernels=True)
            kernel = kernel_graph.check(standard, twin, tokens, settings.window, _chat_prompt_ids(loaded, tokenizer),
                                        set(loaded.eos_token_ids), settings.consistency_tokens, prompt, "fp32",
                                        scores["fp32"],
                                        settings.thresholds_for(options.precision), options.precision,
                                        INT4_KERNEL_THRESHOLDS if options.precision == "int4" else None)
        else:
            logger.info("the kernel graph is written but not checked: %s", reason)
    sizes: dict = {"fp32": validate.folder_bytes([fp32_path, fp32_path.with_name("model.onnx.data")])}
    ratio = agreement = None
    if candidate:
        sizes[candidate] = validate.folder_bytes([model_path, model_path.with_name("model.onnx.data")])
        if prefill_path is not None:
            sizes[f"{candidate}_prefill_graph"] = validate.folder_bytes([prefill_path, Path(f"{prefill_path}.data")])
        ratio = round(scores[candidate].perplexity / scores["fp32"].perplexity, 5)
        agreement = round(float((scores[candidate].argmax == scores["fp32"].argmax).mean()), 5)
        sizes[f"{candidate}_over_fp32"] = round(sizes[candidate] / sizes["fp32"], 4)
    return ValidationReport(
        precision=options.precision,
        heldout=HeldOut(text=HELDOUT_TEXT.name, tokens=len(tokens) - 1, window=settings.window),
        tokenizer_identical_ids=ids == reference_ids, batch_invariant=options.batch_invariant,
        source_max_abs_diff=source_max_abs_diff,
        scores={name: PerplexityScore(round(score.perplexity, 4), score.tokens) for name, score in scores.items()},
        kv_consistency=kv, speed=speed, sizes_bytes=sizes, perplexity_ratio=ratio, greedy_agreement=agreement,
        chat_agreement=chat, target=options.target, provider="CPUExecutionProvider", kernel_graph=kernel)


def _restrict_head(resolved: ResolvedSource, loaded: LoadedModel, dims: DecoderDims, model_path: Path,
                   staging: Path, options: ConvertOptions) -> tuple[DraftHead, np.ndarray]:
    """After validation of the whole model: keep the lm_head rows of the most frequent chat tokens (returned)."""
    import onnx
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(loaded.tokenizer_json)
    folder = resolved.path if resolved.kind == "hf" else None
    train, heldout = draft_head.chat_texts(folder)
    encode = lambda texts: [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
    always = set(loaded.eos_token_ids) | set(tokenizer.get_added_tokens_decoder())
    token_ids = draft_head.rank_tokens(encode(train), options.draft_head, dims.vocab_size, always)
    model = onnx.load(str(model_path))
    draft_head.restrict_lm_head(model, token_ids)
    save_model(model, str(model_path))
    np.save(staging / draft_head.HEAD_TOKENS_FILE, token_ids)
    prompt = tokenizer.encode(_speed_prompt(loaded), add_special_tokens=False).ids
    session = DecoderSession(model_path, io_names(dims.num_layers), dims, 128, threads=options.threads,
                             head_tokens=token_ids, graph=GraphOptions.for_build(options.batch_invariant))
    return DraftHead(tokens=len(token_ids), of=dims.vocab_size, counted_texts=len(train),
                     heldout_coverage=round(draft_head.coverage(token_ids, encode(heldout)), 4),
                     speed=measure.decode_probe(session, prompt)), token_ids


def _restrict_kernel_graph(loaded: LoadedModel, dims: DecoderDims, model_path: Path, staging: Path,
                           options: ConvertOptions, token_ids: np.ndarray,
                           checked: KernelCheck | None) -> tuple[dict, KernelCheck | None]:
    """The twin rebuilt from the restricted model.onnx (the old one points into the data file the restriction
    rewrote), and `checked` (the whole-head twin's check) extended to it: (quantization.kernel_graph, the check)."""
    from tokenizers import Tokenizer

    from . import kernel_graph

    info = kernel_graph.write(staging).describe()
    if checked is None:  # no kernel library here: written unchecked, as the whole-head twin was
        return info, None
    settings = options.validation
    tokenizer = Tokenizer.from_str(loaded.tokenizer_json)
    tokens = tokenizer.encode(HELDOUT_TEXT.read_text(), add_special_tokens=False).ids[:settings.heldout_tokens + 1]
    common = dict(io=io_names(dims.num_layers), dims=dims, capacity=max(settings.window, 64) + 64,
                  threads=options.threads, head_tokens=token_ids, graph=GraphOptions.for_build(False))
    standard = DecoderSession(model_path, **common)
    twin = DecoderSession(model_path, kernel_path=staging / kernel_graph.KERNEL_MODEL, kernels=True, **common)
    prompt = tokenizer.encode(_speed_prompt(loaded), add_special_tokens=False).ids
    return info, kernel_graph.check_restricted_head(checked, standard, twin, tokens, settings.window,
                                                    _chat_prompt_ids(loaded, tokenizer),
                                                    set(loaded.eos_token_ids), prompt,
                                                    settings.thresholds_for(options.precision))


def _chat_prompt_ids(loaded: LoadedModel, tokenizer) -> list[list[int]]:
    """The gate's chat prompts as the model's template renders them (none without a template)."""
    if not loaded.chat_template:
        return []
    return [tokenizer.encode(_render(loaded, q), add_special_tokens=False).ids for q in validate.CHAT_PROMPTS]


def _render(loaded: LoadedModel, question: str) -> str:
    return loaded.hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                   add_generation_prompt=True)


def _speed_prompt(loaded: LoadedModel) -> str:
    return _render(loaded, SPEED_PROMPT[0]["content"]) if loaded.chat_template else SPEED_PROMPT[0]["content"]
