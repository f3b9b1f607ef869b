"""The public model object: load a converted folder, then generate() or stream()."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from tokenizers import Tokenizer

from ..errors import ContextLengthError, InvalidParameterError, ModelFormatError
from ..manifest import MANIFEST_NAME, Manifest, read_manifest, resolve_file, verify_checksums
from ..manifest import fingerprint as manifest_fingerprint
from .chat import ChatTemplate
from .generator import Stream, prefill
from .sampling import ResolvedSampling
from .session import DecoderSession
from .types import CancelToken, GenerationResult, SamplingParams

logger = logging.getLogger(__name__)

Prompt = Union[str, Sequence[dict[str, Any]], Sequence[int]]
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
        self._active: Stream | None = None
        self._active_thread = 0

    @property
    def provider(self) -> str:
        return self.session.provider

    @property
    def speculation(self):
        """Speculative decoding statistics (SpeculationStats), or None when it is not enabled."""
        from .speculative import SpeculativeSession

        return self.session.stats if isinstance(self.session, SpeculativeSession) else None

    @property
    def context_length(self) -> int:
        return self.session.capacity

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise ModelFormatError(f"model {self.manifest.name!r} has no chat template. Fix: pass a plain text prompt.")
        return self.template.render(messages, add_generation_prompt=add_generation_prompt)

    def encode(self, prompt: Prompt, add_generation_prompt: bool = True) -> list[int]:
        """str → raw text; list of dicts → chat template; list of ints → token ids as they are."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            bos = self.manifest.generation.bos_token_id
            if self.manifest.special_tokens.get("add_bos_token") and bos is not None:
                ids = [bos] + ids
        elif len(prompt) > 0 and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        else:
            text = self.render_chat(prompt, add_generation_prompt=add_generation_prompt)  # type: ignore[arg-type]
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise InvalidParameterError("the prompt is empty. Fix: pass some text or at least one message.")
        if len(ids) >= self.context_length:
            raise ContextLengthError(
                f"the prompt has {len(ids)} tokens; the context window holds {self.context_length}, and at least one "
                "must be left to answer. Fix: shorten the prompt, or load with a larger context_length "
                f"(the model allows up to {self.manifest.generation.context_length}).")
        return ids

    def resolve(self, params: SamplingParams | None) -> ResolvedSampling:
        p, d = params or SamplingParams(), self.manifest.generation
        pick = lambda value, default: default if value is None else value  # noqa: E731
        return ResolvedSampling(
            max_new_tokens=pick(p.max_new_tokens, d.max_new_tokens), temperature=pick(p.temperature, d.temperature),
            top_k=pick(p.top_k, d.top_k), top_p=pick(p.top_p, d.top_p),
            repetition_penalty=pick(p.repetition_penalty, d.repetition_penalty), seed=p.seed, stop=p.stop,
            ignore_eos=p.ignore_eos)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, deadline: float | None = None,
               cancel: CancelToken | None = None) -> Stream:
        """Yield StreamChunk as tokens come; `.result` holds the GenerationResult afterwards.

        deadline: seconds from this call; when it passes, generation ends with finish_reason "deadline".
        """
        started = time.perf_counter()
        if deadline is not None and not deadline > 0:
            raise InvalidParameterError(f"deadline={deadline!r} must be a positive number of seconds.")
        settings = self.resolve(params)
        ids = self.encode(prompt)
        self._close_active()
        self._lock.acquire()
        eos = frozenset() if settings.ignore_eos else self._eos
        stream = Stream(self.session, self.tokenizer, ids, settings, eos, deadline, cancel, started,
                        on_close=self._release)
        self._active, self._active_thread = stream, threading.get_ident()
        return stream

    def generate(self, prompt: Prompt, params: SamplingParams | None = None, deadline: float | None = None,
                 cancel: CancelToken | None = None) -> GenerationResult:
        stream = self.stream(prompt, params, deadline, cancel)
        for _ in stream:
            pass
        assert stream.result is not None
        return stream.result

    def prefill(self, prompt: Prompt, cancel: CancelToken | None = None) -> int:
        """Put a prompt in the KV cache ahead of time (a system prompt at start-up, a user turn while it is
        being spoken). Messages are rendered without the generation prompt. Returns tokens now cached."""
        ids = self.encode(prompt, add_generation_prompt=False)
        self._close_active()
        with self._lock:
            prefill(self.session, ids, (lambda: cancel.cancelled) if cancel else None)
            return self.session.length

    def reset(self) -> None:
        """Forget the cache (the next prompt is prefilled from scratch)."""
        self._close_active()
        with self._lock:
            self.session.truncate(0)

    def _close_active(self) -> None:
        # An abandoned stream of this thread gives the model back; another thread's is waited for (lock).
        if self._active is not None and self._active_thread == threading.get_ident():
            self._active.close()

    def _release(self, stream: Stream) -> None:
        if self._active is stream:
            self._active = None
            self._lock.release()


def load(path: str | Path, providers: Sequence[str] | str | None = None, threads: int | None = None,
         context_length: int | None = None, verify: bool = True, draft: str | Path | LLM | None = None,
         fingerprint: str | None = None) -> LLM:
    """Load a model folder written by `edgellm convert`.

    providers: "cpu" (default), "cuda", "tensorrt" or onnxruntime provider names, in order of preference.
    threads: CPU threads for the model (default: onnxruntime's choice, one per core).
    context_length: KV cache size in tokens (default min(model's, 2048)).
    verify: check every file against the manifest's sha256 (about 0.2 s for 150 MB); every file the manifest
        names must have one. Checksums find damage, not tampering: whoever rewrites a file can rewrite them too.
    fingerprint: the folder's expected fingerprint (`edgellm info` prints it: the manifest's sha256); with
        verify, this pins every file, so a tampered folder with recomputed checksums is refused.
    draft: speculative decoding, same output as without it: a smaller model folder with the same tokenizer
        (e.g. from `edgellm distill`), a loaded LLM, or "prompt-lookup" (no second model). It switches
        itself off while it does not pay; `llm.speculation` reports acceptance and timings.
    """
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
        raise InvalidParameterError(f"threads={threads!r} must be an integer >= 1 (or None for one per core).")
    tokenizer = _load_tokenizer(paths["tokenizer"], manifest)
    template = None
    if "chat_template" in paths:
        template = ChatTemplate(_read_text(paths["chat_template"]), manifest.special_tokens.get("template_vars", {}))
    head_tokens = _load_head_tokens(paths, manifest) if manifest.graph.head_tokens else None
    session = DecoderSession(paths["model"], manifest.io, manifest.dims, capacity, providers, threads, head_tokens,
                             graph=manifest.graph)
    logger.info("loaded %s (%s) on %s, context %d", manifest.name, manifest.precision, session.provider, capacity)
    llm = LLM(folder, manifest, session, tokenizer, template)
    if draft is not None:
        from .speculative import enable_speculation

        if isinstance(draft, (str, Path)) and str(draft) != "prompt-lookup":
            draft_limit = read_manifest(Path(draft)).generation.context_length
            draft = load(draft, providers, threads, context_length=min(capacity, draft_limit), verify=verify)
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
