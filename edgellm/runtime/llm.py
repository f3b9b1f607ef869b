"""The public model object: load a converted folder, then generate() or stream()."""

from __future__ import annotations

import logging
import math
import numbers
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Union

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from ..errors import ContextLengthError, InvalidParameterError, ModelFormatError
from ..manifest import MANIFEST_NAME, Manifest, read_manifest, resolve_file, verify_checksums
from ..manifest import fingerprint as manifest_fingerprint
from .chat import ChatTemplate, check_text, validate_messages
from .constraint import GrammarCompiler
from .generator import Stream, _Outcome, prefill
from .kernel_choice import GraphChoice
from .sampling import ResolvedSampling
from .session import GPU_PROVIDERS, DecoderSession, resolve_providers
from .tools import ToolSet, parse_tool_calls
from .types import CancelToken, GenerationResult, SamplingParams

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[dict[str, Any]], Sequence[int]]
_WAIT_POLL_S = 0.05  # how often a stream waiting for the model looks at its cancel token and deadline
DEFAULT_CONTEXT = 2048  # KV buffer tokens unless asked for more: 94 MB for SmolLM2-135M instead of 377 MB at 8k


class LLM:
    """A loaded model with its KV cache. One generation at a time; the cache survives between calls,
    so a prompt that starts like the previous one (system prompt, earlier chat turns) prefills only the rest."""

    def __init__(self, folder: Path, manifest: Manifest, session: DecoderSession, tokenizer: Tokenizer,
                 template: ChatTemplate | None) -> None:
        self.folder = folder
        self.manifest = manifest
        self.session = session
        self.tokenizer = tokenizer
        self.template = template
        self._eos = frozenset(manifest.generation.eos_token_ids)
        self._lock = threading.Lock()
        self._active: _Outcome | None = None  # the generation holding the model
        self._active_thread = 0
        self._grammars: GrammarCompiler | None = None

    @property
    def provider(self) -> str:
        return self.session.provider

    @property
    def graph(self) -> GraphChoice:
        """The decode graph this model runs and why: model.onnx, or its kernel twin with edgellm's kernels."""
        return getattr(self.session, "target", self.session).choice

    @property
    def speculation(self):
        """Speculative decoding statistics (SpeculationStats), or None when it is not enabled."""
        from .speculative import SpeculativeSession

        return self.session.stats if isinstance(self.session, SpeculativeSession) else None

    @property
    def context_length(self) -> int:
        return self.session.capacity

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True,
                    seconds: float | None = None) -> str:
        """seconds: time left for rendering (the rest of a deadline); the template's own limit applies anyway."""
        if self.template is None:
            raise ModelFormatError(f"model {self.manifest.name!r} has no chat template. Fix: pass a plain text prompt.")
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, seconds=seconds)

    def encode(self, prompt: Prompt, add_generation_prompt: bool = True, seconds: float | None = None) -> list[int]:
        """str → raw text; list of dicts → chat template; list of ints → token ids as they are.

        seconds: time left for rendering a chat template (see render_chat)."""
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            bos = self.manifest.generation.bos_token_id
            if self.manifest.special_tokens.get("add_bos_token") and bos is not None:
                ids = [bos] + ids
        elif isinstance(prompt, np.ndarray) and prompt.ndim == 1 and np.issubdtype(prompt.dtype, np.integer):
            ids = self._check_ids(prompt.tolist())
        elif isinstance(prompt, (list, tuple)) and prompt and all(_is_int(t) for t in prompt):
            ids = self._check_ids([int(t) for t in prompt])
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            text = self.render_chat(prompt, add_generation_prompt=add_generation_prompt, seconds=seconds)
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        elif isinstance(prompt, (list, tuple)) and not prompt:
            validate_messages(prompt)  # raises: "messages is empty ..."
            ids = []
        else:
            hint = (" Fix: decode bytes first, e.g. prompt.decode('utf-8')." if isinstance(prompt, (bytes, bytearray))
                    else " Fix: pass one of those (a list may not mix token ids and messages).")
            raise InvalidParameterError(
                f"prompt={prompt!r:.60} ({type(prompt).__name__}) is not a prompt: it must be a str, a list of token "
                "ids or a list of {'role': ..., 'content': ...} messages." + hint)
        if not ids:
            raise InvalidParameterError("the prompt is empty. Fix: pass some text or at least one message.")
        if len(ids) >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; the context window holds {self.context_length}, and at least one "
                "must be left to answer. Fix: shorten the prompt, or load with a larger context_length "
                f"(the model allows up to {self.manifest.generation.context_length}).")
        return ids

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.manifest.dims.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidParameterError(f"token id {bad} in the prompt is outside the vocabulary 0..{vocab - 1}. "
                                        "Fix: pass ids from this model's tokenizer (llm.tokenizer.encode).")
        return ids

    def resolve(self, params: SamplingParams | None) -> ResolvedSampling:
        if params is not None and not isinstance(params, SamplingParams):
            raise InvalidParameterError(f"params={params!r:.60} is a {type(params).__name__}, not SamplingParams. "
                                        "Fix: pass edgellm.SamplingParams(...) (or None for the model's defaults).")
        p, d = params or SamplingParams(), self.manifest.generation
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return ResolvedSampling(
            max_new_tokens=pick(p.max_new_tokens, d.max_new_tokens), temperature=pick(p.temperature, d.temperature),
            top_k=pick(p.top_k, d.top_k), top_p=pick(p.top_p, d.top_p),
            repetition_penalty=pick(p.repetition_penalty, d.repetition_penalty), seed=p.seed, stop=p.stop,
            ignore_eos=p.ignore_eos, constraint=p.constraint)

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles json_schema / regex / grammar constraints for this tokenizer and caches them (bounded)."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.session.vocab_size, sorted(self._eos))
        return self._grammars

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, deadline: float | None = None,
               cancel: CancelToken | None = None, *, tools: Sequence[dict[str, Any]] | None = None,
               tool_choice: str | dict[str, Any] = "auto", parallel_tool_calls: bool = False) -> Stream:
        """Yield StreamChunk as tokens come; `.result` holds the GenerationResult afterwards.

        deadline: seconds from this call, covering template rendering, waiting for the model (another thread's
            generation) and generation; when it passes, generation ends with finish_reason "deadline".
        cancel: a CancelToken; cancel() ends generation (or the wait for the model) within one model step.
        The model is taken at the first next(): one generation at a time, in the order threads ask.
        tools: OpenAI-format function tools (prompt must be chat messages); the reply is decoded under their
            schemas and `.result.tool_calls` holds the parsed calls (see edgellm.runtime.tools).
        A json_schema / regex / grammar in params (or the tools' grammar) is compiled here, so a bad one
        raises ConstraintError at the call.
        """
        started = time.perf_counter()
        if deadline is not None and not (_is_real(deadline) and deadline > 0):
            raise InvalidParameterError(f"deadline={deadline!r:.40} must be a positive number of seconds (or None). "
                                        "Fix: pass e.g. deadline=1.5.")
        _check_cancel(cancel)
        finish = None
        if tools is not None:
            prompt, params = self._with_tools(prompt, params, ToolSet.parse(tools, tool_choice, parallel_tool_calls))
            finish = _attach_tool_calls
        settings = self.resolve(params)
        ids = self.encode(prompt, seconds=None if deadline is None else deadline - (time.perf_counter() - started))
        constraint = self.grammars.start(*settings.constraint) if settings.constraint else None
        eos = frozenset() if settings.ignore_eos else self._eos
        return Stream(self._acquire, self.tokenizer, ids, settings, eos, deadline, cancel, started,
                      constraint=constraint, finish=finish)

    def _with_tools(self, prompt: Prompt, params: SamplingParams | None, toolset: ToolSet):
        if isinstance(prompt, str) or (len(prompt) > 0 and all(isinstance(t, int) for t in prompt)):
            raise InvalidParameterError("tools need the prompt as chat messages ([{'role': 'user', 'content': ...}]) "
                                        "so that the tools can be put in the system message.")
        if params is not None and params.constraint:
            raise InvalidParameterError(f"tools and {params.constraint[0]} were both given; the tools decide the "
                                        "reply's grammar. Fix: pass one of them.")
        return toolset.messages(prompt), replace(params or SamplingParams(), grammar=toolset.grammar())

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, deadline: float | None = None,
                 cancel: CancelToken | None = None, *, tools: Sequence[dict[str, Any]] | None = None,
                 tool_choice: str | dict[str, Any] = "auto", parallel_tool_calls: bool = False) -> GenerationResult:
        """The whole reply at once (see stream() for the arguments)."""
        stream = self.stream(prompt, params, deadline, cancel, tools=tools, tool_choice=tool_choice,
                             parallel_tool_calls=parallel_tool_calls)
        for _ in stream:
            pass
        result = stream.result
        if result is None:  # only if iteration ended without the generator finishing, which it always does
            raise RuntimeError("generation ended without a result")
        return result

    def prefill(self, prompt: Prompt, cancel: CancelToken | None = None) -> int:
        """Put a prompt in the KV cache ahead of time (a system prompt at start-up, a user turn while it is
        being spoken). Messages are rendered without the generation prompt. Returns tokens now cached."""
        _check_cancel(cancel)
        ids = self.encode(prompt, add_generation_prompt=False)
        self._close_active()
        with self._lock:
            prefill(self.session, ids, (lambda: cancel.cancelled) if cancel else None)
            return self.session.length

    def next_token_probability(self, prompt: Prompt, token_ids: Sequence[int],
                               cancel: CancelToken | None = None) -> float | None:
        """Prefill `prompt` as prefill() does (the cache keeps it) and return the total probability that the
        next token is one of `token_ids` (greedy-free: the softmax of the raw logits). None when cancelled.

        Nearly free after a prefill of the same prompt: only its last token is recomputed. The voice demo
        asks it for P(end of the user's message) after the words heard so far (a text end-of-turn signal).
        """
        _check_cancel(cancel)
        wanted = np.asarray(list(token_ids), dtype=np.int64)
        if wanted.size == 0 or wanted.min() < 0 or wanted.max() >= self.session.vocab_size:
            raise InvalidParameterError(f"token_ids={list(token_ids)[:8]!r} must be a non-empty list of ids below "
                                        f"the vocabulary size {self.session.vocab_size}. Fix: take them from "
                                        "llm.tokenizer.")
        ids = self.encode(prompt, add_generation_prompt=False)
        self._close_active()
        with self._lock:
            logits, _ = prefill(self.session, ids, (lambda: cancel.cancelled) if cancel else None)
        if logits is None:
            return None
        shifted = np.exp(logits.astype(np.float64) - float(np.max(logits)))
        return float(shifted[np.unique(wanted)].sum() / shifted.sum())

    def reset(self) -> None:
        """Forget the cache (the next prompt is prefilled from scratch)."""
        self._close_active()
        with self._lock:
            self.session.truncate(0)

    def _acquire(self, outcome: _Outcome, should_stop) -> tuple[DecoderSession, Any] | None:
        """Wait for the model (giving up when should_stop() turns true); the stream calls release() when done."""
        self._close_active()
        while not self._lock.acquire(timeout=_WAIT_POLL_S):
            if should_stop():
                return None
        self._active, self._active_thread = outcome, threading.get_ident()

        def release() -> None:
            if self._active is outcome:
                self._active = None
                self._lock.release()

        return self.session, release

    def _close_active(self) -> None:
        # A stream this thread started and left half-way gives the model back (another thread's is waited for).
        active = self._active
        if active is not None and self._active_thread == threading.get_ident():
            stream = active.stream()
            if stream is not None:
                stream.close()


def _attach_tool_calls(result: GenerationResult) -> GenerationResult:
    calls = parse_tool_calls(result.text) if result.finish_reason == "stop" else ()
    return replace(result, tool_calls=calls, finish_reason="tool_calls") if calls else result


def _check_cancel(cancel: Any) -> None:
    # A CancelToken, or anything with the same `cancelled` property (e.g. a server's per-request token).
    if cancel is not None and not isinstance(cancel, CancelToken) and not hasattr(type(cancel), "cancelled"):
        raise InvalidParameterError(f"cancel={cancel!r:.40} is not a CancelToken. Fix: pass "
                                    "cancel=edgellm.CancelToken() and call its cancel() to stop.")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _warn_if_mismatched(manifest: Manifest, target: str, provider: str) -> None:
    """One warning when a folder runs where it was not built for: it works, just slower."""
    on_gpu = provider in GPU_PROVIDERS
    if target == "cuda" and not on_gpu:
        logger.warning("%s was converted for NVIDIA GPUs (--target cuda: fp16 attention and KV cache) and runs on "
                       "%s here, which works but decodes slower than a folder converted for the CPU. Fix: install "
                       "onnxruntime-gpu (a Jetson: the JetPack wheel), or convert with --target cpu for this "
                       "machine.", manifest.name, provider)
    elif target == "cpu" and on_gpu:
        logger.warning("%s was converted for the CPU (fp32 attention, which has no CUDA kernel) and runs on %s, "
                       "so attention falls back to the CPU each step. Fix: convert with --target cuda for the GPU.",
                       manifest.name, provider)


def load(path: str | Path, providers: Sequence[str] | str | None = None, threads: int | None = None,
         context_length: int | None = None, verify: bool = True, draft: str | Path | LLM | None = None,
         fingerprint: str | None = None, kernels: bool | None = None, spin: bool = True) -> LLM:
    """Load a model folder written by `edgellm convert`.

    providers: "cpu", "cuda", "tensorrt" or onnxruntime provider names, in order of preference. Default: "cpu",
        or "cuda" for a folder converted --target cuda when this onnxruntime has CUDA (else the CPU, with a warning).
    threads: CPU threads for the model (default: onnxruntime's choice, one per core).
    context_length: KV cache size in tokens (default min(model's, 2048)).
    verify: check every file against the manifest's sha256 (about 0.2 s for 150 MB); every file the manifest
        names must have one. Checksums find damage, not tampering: whoever rewrites a file can rewrite them too.
    fingerprint: the folder's expected fingerprint (`edgellm info` prints it: the manifest's sha256); with
        verify, this pins every file, so a tampered folder with recomputed checksums is refused.
    draft: speculative decoding, same output as without it: a smaller model folder with the same tokenizer
        (e.g. from `edgellm distill`), a loaded LLM, or "prompt-lookup" (no second model). It switches
        itself off while it does not pay; `llm.speculation` reports acceptance and timings.
    kernels: edgellm's own int8 CPU kernels (the folder's model.kernels.onnx, edgellm.kernels' library). None:
        where they can run (CPU provider, the folder has the twin, the library is built for this machine), else the
        standard graph; False: never; True: required (KernelError naming why they cannot run). None defers to
        EDGELLM_KERNELS (0: never, 1: required). `llm.graph` says which graph runs and why.
    spin: onnxruntime's threads keep spinning a while after each step, ready for the next (fastest for a model
        decoding alone). False stops them at once, so they leave the cores to other work: a draft folder passed
        as `draft` is loaded so (its spinning threads slowed the model's verify passes ~20x: 10 ms extra for one
        draft token instead of 0.5, SmolLM2 with a 10-layer draft on 2 cores); load your own draft LLM with it.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidParameterError(f"path={path!r:.60} must be a model folder path (str or Path). "
                                    "Fix: pass e.g. edgellm.load('models/smollm2-135m-instruct').")
    if draft is not None and not isinstance(draft, (str, os.PathLike, LLM)):
        raise InvalidParameterError(f"draft={draft!r:.60} must be a model folder, a loaded LLM or 'prompt-lookup'. "
                                    "Fix: pass one of those, or None for no speculative decoding.")
    folder = Path(path)
    manifest = read_manifest(folder)
    if fingerprint is not None:
        actual = manifest_fingerprint(folder)
        if not isinstance(fingerprint, str) or actual != fingerprint.strip().lower():
            raise ModelFormatError(f"{folder / MANIFEST_NAME} has fingerprint {actual}, not the expected "
                                   f"{fingerprint!r}: the folder is not the one you pinned. Fix: re-convert or re-copy "
                                   "the model, or pin the new fingerprint if the change was yours.")
        if not verify:
            raise InvalidParameterError("fingerprint needs verify=True (the fingerprint pins files only through "
                                        "their checksums). Fix: drop verify=False.")
    if verify:
        verify_checksums(folder, manifest)
    paths = {role: resolve_file(folder, manifest, role) for role in manifest.files}
    limit = manifest.generation.context_length
    if context_length is not None and (isinstance(context_length, bool) or not isinstance(context_length, int)
                                       or not 1 < context_length <= limit):
        raise InvalidParameterError(f"context_length={context_length!r} is out of range: it must be an integer in "
                                    f"2..{limit} (the model's context). Fix: pass a value in that range, or None.")
    capacity = context_length or min(limit, DEFAULT_CONTEXT)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise InvalidParameterError(f"threads={threads!r:.40} must be an integer >= 1 (or None for one per core). "
                                    "Fix: pass e.g. threads=2.")
    tokenizer = _load_tokenizer(paths["tokenizer"], manifest)
    template = None
    if "chat_template" in paths:
        template = ChatTemplate(_read_text(paths["chat_template"]), manifest.special_tokens.get("template_vars", {}))
    head_tokens = _load_head_tokens(paths, manifest) if manifest.graph.head_tokens else None
    target = manifest.graph.target
    if providers is None and target == "cuda":  # a GPU folder prefers the GPU when this install has one
        providers = "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else None
    prefill_path = paths.get("prefill_model")
    if prefill_path is not None and resolve_providers(providers)[0] != "CPUExecutionProvider":
        prefill_path = None  # a CPU graph for prompts: on a GPU the decode graph does both
    if not isinstance(spin, bool):
        raise InvalidParameterError(f"spin={spin!r:.40} must be True or False. Fix: pass spin=False for a draft model.")
    session = DecoderSession(paths["model"], manifest.io, manifest.dims, capacity, providers, threads, head_tokens,
                             graph=manifest.graph, prefill_path=prefill_path, kernel_path=paths.get("kernel_model"),
                             kernels=kernels, spin_after_run=spin)
    _warn_if_mismatched(manifest, target, session.provider)
    logger.info("loaded %s (%s) on %s, context %d, graph %s", manifest.name, manifest.precision, session.provider,
                capacity, session.choice.graph)
    llm = LLM(folder, manifest, session, tokenizer, template)
    if draft is not None:
        from .speculative import enable_speculation

        if isinstance(draft, (str, Path)) and str(draft) != "prompt-lookup":
            draft_limit = read_manifest(Path(draft)).generation.context_length
            draft = load(draft, providers, threads, context_length=min(capacity, draft_limit), verify=verify,
                         kernels=None if kernels is True else kernels, spin=False)  # its own twin where it has one
        enable_speculation(llm, draft)
    return llm


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelFormatError(f"{path} cannot be read as UTF-8 text ({exc}). Fix: re-run `edgellm convert`.") from exc


def _load_tokenizer(path: Path, manifest: Manifest) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_str(_read_text(path))
    except Exception as exc:  # noqa: BLE001 - the tokenizers binding raises plain Exception for a bad file
        if isinstance(exc, ModelFormatError):
            raise
        reason = " ".join(str(exc).split())[:200]
        raise ModelFormatError(f"{path} is not a valid tokenizer ({reason}). Fix: re-run `edgellm convert`.") from exc
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > manifest.dims.vocab_size:
        raise ModelFormatError(f"{path} has {size} tokens but the model's vocabulary (dims.vocab_size) is "
                               f"{manifest.dims.vocab_size}: they do not belong together. Fix: re-run `edgellm convert`.")
    return tokenizer


def _load_head_tokens(paths: dict[str, Path], manifest: Manifest) -> np.ndarray:
    name = manifest.graph.head_tokens
    path = next((p for p in paths.values() if p.name == name), None)
    if path is None:
        raise ModelFormatError(f"graph.head_tokens names {name!r}, which files does not list. "
                               "Fix: re-run `edgellm convert --draft-head`.")
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path} is not a readable .npy file ({exc}). Fix: re-run `edgellm convert`.") from exc
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or len(ids) == 0 \
            or ids.min() < 0 or ids.max() >= manifest.dims.vocab_size:
        raise ModelFormatError(f"{path} must hold a 1-D list of token ids in 0..{manifest.dims.vocab_size - 1}. "
                               "Fix: re-run `edgellm convert --draft-head`.")
    return ids
