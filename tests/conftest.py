"""Shared fixtures: a tiny random Llama (fast, exact checks) and the real default model (integration).

The tiny model is built here with transformers and converted end to end once per session.
Where torch is not installed (the arm64 root of scripts/test_arm64.sh), EDGELLM_TEST_TINY_MODELS names a
folder of the same tiny models exported beforehand (`export_tiny_models`), and the fixtures load those.
The default model is converted once per machine into .cache/models/ and re-used while its
manifest says it passed the gate (delete the folder to force a fresh conversion).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = Path(os.environ.get("EDGELLM_TEST_MODEL", REPO / ".cache" / "models" / "smollm2-135m-instruct"))
TINY_MODELS = os.environ.get("EDGELLM_TEST_TINY_MODELS")
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-level BPE trained in milliseconds on the bundled held-out text, with chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    import edgellm

    text = (Path(edgellm.__file__).parent / "data" / "heldout_en.txt").read_text()  # installed or checkout
    tokenizer.train_from_iterator([text, "héllo wörld 你好 🙂 café"], trainer)
    return tokenizer


def build_tiny_hf_model(folder: Path, layers: int = 2, seed: int = 0, tied: bool = True) -> Path:
    """A random LlamaForCausalLM with GQA and (unless tied=False) tied embeddings, saved as a Hugging Face folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the init's 0.02, so logits have structure worth comparing
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory) -> Path:
    return build_tiny_hf_model(tmp_path_factory.mktemp("tiny-hf") / "tiny-llama")


# onnxruntime's own CPU-detection messages (its cpuinfo library), printed at import where it cannot read the CPU's
# topology: on some ARM boards, and always in the arm64 root of scripts/test_arm64.sh (no /sys under emulation).
ORT_PLATFORM_MESSAGES = ("Error in cpuinfo:", "onnxruntime cpuid_info warning:",
                         "onnxruntime warning: cpuinfo_initialize failed")


def app_stderr_lines(stderr: str) -> list[str]:
    """A subprocess's non-blank stderr lines, less onnxruntime's CPU-detection messages: what edgellm printed."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(ORT_PLATFORM_MESSAGES)]


HEAVY_MODULES = ("torch", "transformers", "optimum")  # what `import edgellm` and a generation must never load

FRESH_GENERATION = """
import json, sys
import edgellm
folder, threads, prompt, params = json.loads(sys.argv[1])
result = edgellm.load(folder, threads=threads).generate(prompt, edgellm.SamplingParams(**params))
heavy = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)
print(json.dumps({"text": result.text, "token_ids": result.token_ids, "heavy_modules": heavy}))
"""


def generate_in_fresh_process(folder: Path, prompt, threads: int, **params) -> dict:
    """Load `folder` and generate once in a new Python process: {text, token_ids, heavy_modules (of HEAVY_MODULES,
    those the process imported)}. A fresh process, because this one has torch loaded by the converting fixtures."""
    args = json.dumps([str(folder), threads, prompt, params])
    done = subprocess.run([sys.executable, "-c", FRESH_GENERATION, args, json.dumps(HEAVY_MODULES)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# The draft model of the speculative tests: a different random model with the same tokenizer.
DRAFT_LAYERS, DRAFT_SEED = 1, 1


def _prebuilt(name: str) -> Path | None:
    """The exported folder `name` under EDGELLM_TEST_TINY_MODELS, or None when the fixtures convert."""
    if not TINY_MODELS:
        return None
    folder = Path(TINY_MODELS) / name
    if not (folder / "edgellm.json").is_file():
        pytest.fail(f"EDGELLM_TEST_TINY_MODELS={TINY_MODELS} has no model folder {name!r}. "
                    "Fix: export them with scripts/arm64/export_tiny_models.py.", pytrace=False)
    return folder


def export_tiny_models(out: Path) -> dict[str, Path]:
    """Convert every tiny test model into out/<name>: the folders EDGELLM_TEST_TINY_MODELS hands to the fixtures."""
    hf = build_tiny_hf_model(out / "hf" / "tiny-llama")
    draft_hf = build_tiny_hf_model(out / "hf" / "draft", layers=DRAFT_LAYERS, seed=DRAFT_SEED)
    return {"fp32": _convert(hf, out / "fp32", "fp32"), "int8": _convert(hf, out / "int8", "int8"),
            "int8-bi": _convert(hf, out / "int8-bi", "int8", batch_invariant=True),
            "cuda": _convert(hf, out / "cuda", "int8", target="cuda"),
            "draft-fp32": _convert(draft_hf, out / "draft-fp32", "fp32")}


def _convert(source: Path, out: Path, precision: str, batch_invariant: bool = False, target: str = "cpu") -> Path:
    if TINY_MODELS:
        pytest.fail(f"this test converts {source} (torch), but EDGELLM_TEST_TINY_MODELS is set: only exported "
                    "folders exist here. Fix: add the model to export_tiny_models and load it with _prebuilt.",
                    pytrace=False)
    from edgellm.convert.pipeline import ConvertOptions, convert
    from edgellm.convert.validate import ValidationSettings

    settings = ValidationSettings(heldout_tokens=256, window=128, consistency_tokens=24)
    # A random model's int8 ppl can drift more than a trained one's: the gate is tested on the real model.
    convert(str(source), out, ConvertOptions(precision=precision, gate=False, progress=False, validation=settings,
                                             batch_invariant=batch_invariant, target=target))
    return out


@pytest.fixture(scope="session")
def tiny_fp32_dir(request, tmp_path_factory) -> Path:
    return _prebuilt("fp32") or _convert(request.getfixturevalue("tiny_hf_dir"),
                                          tmp_path_factory.mktemp("tiny-fp32") / "model", "fp32")


@pytest.fixture(scope="session")
def tiny_int8_dir(request, tmp_path_factory) -> Path:
    return _prebuilt("int8") or _convert(request.getfixturevalue("tiny_hf_dir"),
                                          tmp_path_factory.mktemp("tiny-int8") / "model", "int8")


@pytest.fixture(scope="session")
def tiny_int8_invariant_dir(request, tmp_path_factory) -> Path:
    """The tiny model at int8, converted with --batch-invariant."""
    return _prebuilt("int8-bi") or _convert(request.getfixturevalue("tiny_hf_dir"),
                                             tmp_path_factory.mktemp("tiny-int8-bi") / "model", "int8",
                                             batch_invariant=True)


@pytest.fixture(scope="session")
def tiny_cuda_dir(request, tmp_path_factory) -> Path:
    """The tiny model converted for the GPU (--target cuda: fp16 activations and KV cache, int8 weights)."""
    return _prebuilt("cuda") or _convert(request.getfixturevalue("tiny_hf_dir"),
                                          tmp_path_factory.mktemp("tiny-cuda") / "model", "int8", target="cuda")


def cuda_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _deselect_converting_tests(config, items) -> None:
    """Under EDGELLM_TEST_TINY_MODELS (no torch): tests that convert from the Hugging Face source cannot run;
    they are deselected (they run in the main suite), and the summary says how many."""
    converting = [item for item in items if "tiny_hf_dir" in getattr(item, "fixturenames", ())]
    if converting:
        config.hook.pytest_deselected(items=converting)
        items[:] = [item for item in items if item not in converting]
    config._edgellm_converting_deselected = len(converting)


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need onnxruntime's CUDA provider: skipped, with the reason, where it is missing —
    unless EDGELLM_REQUIRE_GPU=1 (scripts/gpu_check.sh), where a missing GPU is a failure, not a skip."""
    if TINY_MODELS:
        _deselect_converting_tests(config, items)
    if cuda_available() or os.environ.get("EDGELLM_REQUIRE_GPU") == "1":
        return
    import onnxruntime

    skip = pytest.mark.skip(reason="no CUDA provider in this onnxruntime build (available: "
                                   f"{', '.join(onnxruntime.get_available_providers())}); run scripts/gpu_check.sh "
                                   "on a machine with an NVIDIA GPU")
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    for item in gpu_items:
        item.add_marker(skip)
    config._edgellm_gpu_skipped = (len(gpu_items), skip.kwargs["reason"])


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say why the gpu tests did not run, even under -q (where skip reasons are not listed)."""
    count, reason = getattr(config, "_edgellm_gpu_skipped", (0, ""))
    if count:
        terminalreporter.write_line(f"{count} tests marked gpu skipped: {reason}")
    converting = getattr(config, "_edgellm_converting_deselected", 0)
    if converting:
        terminalreporter.write_line(f"{converting} tests deselected: they convert a model (torch), which "
                                    "EDGELLM_TEST_TINY_MODELS runs leave to the main suite")


def _usable(folder: Path, precision: str, batch_invariant: bool, target: str = "cpu") -> bool:
    manifest = folder / "edgellm.json"
    if not manifest.is_file():
        return False
    from edgellm.convert.pipeline import CONVERTER_REVISION

    data = json.loads(manifest.read_text())
    return (data.get("precision") == precision and data.get("validation", {}).get("gate", {}).get("passed", False)
            and data.get("tools", {}).get("converter_revision") == CONVERTER_REVISION
            and data.get("graph", {}).get("batch_invariant", False) == batch_invariant
            and data.get("graph", {}).get("target", "cpu") == target)


def _default_model(folder: Path, precision: str, batch_invariant: bool = False, target: str = "cpu") -> Path:
    if not _usable(folder, precision, batch_invariant, target):
        folder.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "edgellm.cli", "convert", "smollm2-135m-instruct", "-o", str(folder),
               "--precision", precision, "--target", target, "--force", "--quiet"] \
            + (["--batch-invariant"] if batch_invariant else [])
        subprocess.run(cmd, check=True)
    return folder


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model, int8, converted once per machine (about 2 minutes on 2 cores)."""
    return _default_model(DEFAULT_MODEL_DIR, "int8")


@pytest.fixture(scope="session")
def default_invariant_dir() -> Path:
    """The real default model at int8, converted --batch-invariant (exact speculative decoding)."""
    return _default_model(DEFAULT_MODEL_DIR.with_name(DEFAULT_MODEL_DIR.name + "-bi"), "int8", batch_invariant=True)


@pytest.fixture(scope="session")
def default_cuda_dir() -> Path:
    """The real default model converted --target cuda (fp16 activations/KV, int8 weights); runs on the CPU too."""
    return _default_model(DEFAULT_MODEL_DIR.with_name(DEFAULT_MODEL_DIR.name + "-cuda"), "int8", target="cuda")


@pytest.fixture(scope="session")
def default_int4_dir() -> Path:
    """The real default model at int4 (mixed 4/8-bit), converted once per machine (about 3 minutes)."""
    return _default_model(DEFAULT_MODEL_DIR.with_name(DEFAULT_MODEL_DIR.name + "-int4"), "int4")


@pytest.fixture(scope="session")
def default_fp32_dir() -> Path:
    """The real default model at fp32 (no quantization): the reference the int8 model is judged against."""
    return _default_model(DEFAULT_MODEL_DIR.with_name(DEFAULT_MODEL_DIR.name + "-fp32"), "fp32")


@pytest.fixture(scope="module")
def kernel_library() -> Path:
    """edgellm's built kernel library; on x86-64 Linux a missing one fails (CI builds it in scripts/setup.sh)."""
    from edgellm import kernels

    path = kernels.library_path()
    if path is None:
        pytest.fail(f"{kernels.default_library()} is not built or does not load; CI builds it in scripts/setup.sh. "
                    "Fix: python -m edgellm.kernels build")
    return path
