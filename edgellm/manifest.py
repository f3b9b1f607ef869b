"""The model folder's self-description (`edgellm.json`): what the runtime needs, and proof of what it is.

Written by `edgellm convert`, read by `edgellm.load`. Torch-free on purpose: both sides import it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import ModelFormatError

MANIFEST_NAME = "edgellm.json"
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 22


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    def from_dict(cls, data: dict) -> "GenerationDefaults":
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        values["eos_token_ids"] = tuple(values["eos_token_ids"])
        return cls(**values)


@dataclass
class Manifest:
    name: str
    architecture: str
    precision: str
    dims: dict
    io: dict
    files: dict  # role -> file name: model, weights, tokenizer, chat_template
    generation: GenerationDefaults
    graph: dict = field(default_factory=dict)  # build choices the runtime may care about (batch_invariant)
    special_tokens: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    validation: dict = field(default_factory=dict)
    tools: dict = field(default_factory=dict)
    checksums: dict = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        data = asdict(self)
        data["generation"]["eos_token_ids"] = list(self.generation.eos_token_ids)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Manifest":
        values = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        values["generation"] = GenerationDefaults.from_dict(data["generation"])
        return cls(**values)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path

    def record_checksums(self, folder: str | Path) -> None:
        """sha256 of every file in the folder except the manifest itself."""
        root = Path(folder)
        self.checksums = {
            str(p.relative_to(root)): sha256_file(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME
        }


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
        data = json.loads(path.read_text())
        manifest = Manifest.from_dict(data)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelFormatError(f"{path} is not a valid edgellm manifest ({exc}). Fix: re-run `edgellm convert`.") from exc
    if manifest.format_version > FORMAT_VERSION:
        raise ModelFormatError(
            f"{path} has format version {manifest.format_version}; this edgellm reads up to {FORMAT_VERSION}. "
            "Fix: pip install -U edgellm"
        )
    return manifest


def verify_checksums(folder: str | Path, manifest: Manifest) -> None:
    """Raise ModelFormatError naming every missing or changed file."""
    root = Path(folder)
    problems = []
    for name, expected in manifest.checksums.items():
        path = root / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name} does not match its sha256 in {MANIFEST_NAME} (changed or truncated)")
    if problems:
        raise ModelFormatError(
            f"model folder {str(root)!r} is damaged: " + "; ".join(problems)
            + ". Fix: re-run `edgellm convert` (or load with verify=False if you changed it on purpose)."
        )
