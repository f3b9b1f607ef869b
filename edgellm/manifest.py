"""The model folder's self-description (`edgellm.json`): what the runtime needs, and proof of what it is.

Written by `edgellm convert`, read by `edgellm.load`. Torch-free on purpose: both sides import it.
The graph's shape lives in `edgellm.contract` (dims, I/O names, graph options); this module reads
and writes the rest, and checks every field's type on read so a bad manifest fails at load, naming
the field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .contract import GraphOptions, IONames, ModelDims
from .errors import ModelFormatError
from .validation import ValidationReport

logger = logging.getLogger(__name__)

MANIFEST_NAME = "edgellm.json"
BENCHMARKS_NAME = "benchmarks.json"  # written later by `edgellm bench --save` (edgellm.runtime.benchmarks)
# Not the model, so not in its checksums: measured figures, and caches the runtime writes (TensorRT engines).
UNCHECKED_FILES = (MANIFEST_NAME, BENCHMARKS_NAME)
UNCHECKED_DIRS = (".cache",)
FORMAT_VERSION = 1
REQUIRED_FILES = ("model", "tokenizer")
_HASH_CHUNK = 1 << 22
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX = "Fix: re-run `edgellm convert` to write a fresh model folder."


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _bad(where: str, value: Any, expected: str) -> ModelFormatError:
    return ModelFormatError(f"manifest field {where}={value!r} is invalid: it must be {expected}. {_FIX}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class GenerationDefaults:
    """What the model itself says about generation; SamplingParams fields left as None fall back here."""

    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    context_length: int
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None

    @classmethod
    def from_dict(cls, data: Any, vocab_size: int | None = None) -> "GenerationDefaults":
        if not isinstance(data, dict):
            raise _bad("generation", data, "a JSON object")
        ids_ok = lambda v: _is_int(v) and 0 <= v < (vocab_size or 2**62)  # noqa: E731
        limit = f"token ids in 0..{vocab_size - 1}" if vocab_size else "token ids >= 0"
        eos = data.get("eos_token_ids")
        if not isinstance(eos, list) or not eos or not all(ids_ok(t) for t in eos):
            raise _bad("generation.eos_token_ids", eos, f"a non-empty list of {limit}")
        bos = data.get("bos_token_id")
        if bos is not None and not ids_ok(bos):
            raise _bad("generation.bos_token_id", bos, f"null or one of the {limit}")
        context = data.get("context_length")
        if not _is_int(context) or context < 2:
            raise _bad("generation.context_length", context, "an integer >= 2 (tokens)")
        checks = {
            "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
            "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
            "top_k": (lambda v: v is None or (_is_int(v) and v >= 1), "null or an integer >= 1"),
            "top_p": (lambda v: v is None or (_is_number(v) and 0 < v <= 1), "null or a number in (0, 1]"),
            "repetition_penalty": (lambda v: v is None or (_is_number(v) and v > 0), "null or a number > 0"),
        }
        values: dict[str, Any] = {}
        for name, (ok, expected) in checks.items():
            if name in data:
                if not ok(data[name]):
                    raise _bad(f"generation.{name}", data[name], expected)
                values[name] = data[name]
        return cls(eos_token_ids=tuple(eos), bos_token_id=bos, context_length=context, **values)

    def to_dict(self) -> dict:
        return {"eos_token_ids": list(self.eos_token_ids), "bos_token_id": self.bos_token_id,
                "context_length": self.context_length, "max_new_tokens": self.max_new_tokens,
                "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
                "repetition_penalty": self.repetition_penalty}


@dataclass
class Manifest:
    name: str
    architecture: str
    precision: str
    dims: ModelDims
    io: IONames
    files: dict  # role -> file name inside the folder: model, weights, tokenizer, chat_template, head_tokens
    generation: GenerationDefaults
    graph: GraphOptions = field(default_factory=GraphOptions)
    special_tokens: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    validation: ValidationReport | None = None  # what convert measured and the gate's verdict
    tools: dict = field(default_factory=dict)
    checksums: dict = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "precision": self.precision,
                "dims": self.dims.to_dict(), "io": self.io.to_dict(), "files": dict(self.files),
                "generation": self.generation.to_dict(), "graph": self.graph.to_dict(),
                "special_tokens": self.special_tokens, "quantization": self.quantization, "source": self.source,
                "validation": self.validation.to_dict() if self.validation is not None else {}, "tools": self.tools, "checksums": self.checksums,
                "created": self.created, "format_version": self.format_version}

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Check every field the runtime uses; raise ModelFormatError naming the first bad one."""
        if not isinstance(data, dict):
            raise _bad("(top level)", type(data).__name__, "a JSON object")
        version = data.get("format_version", FORMAT_VERSION)
        if not _is_int(version) or version < 1:
            raise _bad("format_version", version, f"an integer in 1..{FORMAT_VERSION}")
        if version > FORMAT_VERSION:
            raise ModelFormatError(
                f"the manifest has format_version {version}; this edgellm reads up to {FORMAT_VERSION}. "
                "Fix: pip install -U edgellm")
        for name in ("name", "architecture", "precision"):
            if not isinstance(data.get(name), str) or not data[name]:
                raise _bad(name, data.get(name), "a non-empty string")
        dims = ModelDims.from_dict(data.get("dims"))
        files = data.get("files")
        if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise _bad("files", files, "an object mapping roles (model, tokenizer, ...) to file names")
        for role in REQUIRED_FILES:
            if role not in files:
                raise ModelFormatError(f"manifest field files.{role} is missing; the runtime needs the {role} file. "
                                       f"{_FIX}")
        for role, name in files.items():
            if not name or os.path.isabs(name) or ".." in Path(name).parts:
                raise _bad(f"files.{role}", name, "a file name inside the model folder (no absolute path, no '..')")
        checksums = data.get("checksums", {})
        if not isinstance(checksums, dict) or not all(isinstance(k, str) and isinstance(v, str) and _SHA256.fullmatch(v)
                                                      for k, v in checksums.items()):
            raise _bad("checksums", checksums, "an object mapping file names to 64-digit lowercase sha256 hex digests")
        extras = {}
        for name in ("special_tokens", "quantization", "source", "tools"):
            value = data.get(name, {})
            if not isinstance(value, dict):
                raise _bad(name, value, "a JSON object")
            extras[name] = value
        if not isinstance(extras["special_tokens"].get("add_bos_token", False), bool):
            raise _bad("special_tokens.add_bos_token", extras["special_tokens"]["add_bos_token"], "true or false")
        template_vars = extras["special_tokens"].get("template_vars", {})
        if not isinstance(template_vars, dict) or not all(isinstance(v, str) for v in template_vars.values()):
            raise _bad("special_tokens.template_vars", template_vars, "an object of strings")
        return cls(name=data["name"], architecture=data["architecture"], precision=data["precision"], dims=dims,
                   io=IONames.from_dict(data.get("io"), dims.num_layers), files=dict(files),
                   generation=GenerationDefaults.from_dict(data.get("generation"), dims.vocab_size),
                   graph=GraphOptions.from_dict(data.get("graph", {})), checksums=dict(checksums),
                   created=str(data.get("created", "")), format_version=version,
                   validation=_validation(data.get("validation")), **extras)

    def write(self, folder: str | Path) -> Path:
        """Atomic: a reader sees the old manifest or the new one, never half of one."""
        path = Path(folder) / MANIFEST_NAME
        partial = path.with_name(f".{MANIFEST_NAME}.partial-{os.getpid()}")
        partial.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        os.replace(partial, path)
        return path

    def record_checksums(self, folder: str | Path) -> None:
        """sha256 of every file in the folder except the manifest, saved benchmarks and runtime caches."""
        root = Path(folder)
        self.checksums = {
            str(p.relative_to(root)): sha256_file(p)
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name not in UNCHECKED_FILES
            and p.relative_to(root).parts[0] not in UNCHECKED_DIRS
        }


def _validation(data: Any) -> ValidationReport | None:
    """The runtime does not need the report, so one it cannot read (an older converter's) is dropped with a
    warning rather than refusing a model that loads; `edgellm info` then says it has none."""
    if not data:
        return None
    try:
        return ValidationReport.from_dict(data)
    except ModelFormatError as exc:
        logger.warning("ignoring the manifest's validation report: %s", exc)
        return None


def read_manifest(folder: str | Path) -> Manifest:
    root = Path(folder)
    if not root.is_dir():
        raise ModelFormatError(
            f"model folder {str(root)!r} does not exist. "
            "Fix: convert one first, e.g. `edgellm convert smollm2-135m-instruct -o models/smollm2-135m-instruct`"
        )
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ModelFormatError(
            f"{str(root)!r} has no {MANIFEST_NAME}, so it is not an edgellm model folder "
            "(or its conversion did not finish). Fix: point to a folder written by `edgellm convert`."
        )
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path} cannot be read as JSON ({exc}). {_FIX}") from exc
    try:
        return Manifest.from_dict(data)
    except ModelFormatError as exc:
        raise ModelFormatError(f"{path}: {exc}") from None


def resolve_file(folder: str | Path, manifest: Manifest, role: str) -> Path:
    """The path of a file the manifest names, refusing anything outside the folder (.., symlinks out)."""
    root = Path(folder)
    path = root / manifest.files[role]
    target = Path(os.path.realpath(path))
    if not target.is_relative_to(os.path.realpath(root)):
        raise ModelFormatError(
            f"{path} ({role}) leads to {target}, outside the model folder; edgellm reads only files inside it. "
            "Fix: copy the file into the folder instead of linking to it.")
    if not path.is_file():
        what = "is missing" if not path.exists() else "is not a regular file"
        raise ModelFormatError(f"{path} ({role} file named in {MANIFEST_NAME}) {what}. {_FIX}")
    return path


def verify_checksums(folder: str | Path, manifest: Manifest) -> None:
    """Raise ModelFormatError naming every missing, changed or unlisted file.

    Every file the manifest names (model, weights, tokenizer, chat template, ...) must have a checksum: a manifest
    whose checksums leave one out (or are empty) proves nothing about it. Checksums find damage, not malice: whoever
    can rewrite the files can rewrite the manifest too. Pin a folder with `load(..., fingerprint=...)`.
    """
    root = Path(folder)
    problems = []
    uncovered = [f"{name} ({role})" for role, name in manifest.files.items() if name not in manifest.checksums]
    if uncovered:
        problems.append(f"{', '.join(uncovered)} have no sha256 in {MANIFEST_NAME} (checksums list "
                        f"{len(manifest.checksums)} files; every file the manifest names must be covered)")
    for name, expected in manifest.checksums.items():
        path = root / name
        if os.path.isabs(name) or ".." in Path(name).parts:
            problems.append(f"checksum entry {name!r} points outside the folder")
        elif not path.is_file():
            problems.append(f"{name} is missing")
        else:
            try:
                actual = sha256_file(path)
            except OSError as exc:
                problems.append(f"{name} cannot be read ({exc.strerror or exc})")
                continue
            if actual != expected:
                problems.append(f"{name} does not match its sha256 in {MANIFEST_NAME} (changed or truncated)")
    if problems:
        raise ModelFormatError(
            f"model folder {str(root)!r} is damaged: " + "; ".join(problems)
            + ". Fix: re-run `edgellm convert` (or load with verify=False if you changed it on purpose)."
        )


def fingerprint(folder: str | Path) -> str:
    """sha256 of the manifest file: with checksums verified, it pins every file of the folder."""
    return sha256_file(Path(folder) / MANIFEST_NAME)
