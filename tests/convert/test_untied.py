"""A source whose embedding is NOT its lm_head (TinyLlama-style): int8 must keep the two apart.

Before the fix, quantize.py re-tied the embedding to the int8 lm_head after comparing shapes only, so an
untied model read lm_head rows as its token embeddings: a different function, which --no-gate would ship.
"""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForCausalLM

from edgellm.convert.pipeline import ConvertOptions, convert
from edgellm.convert.quantize import embedding_equals_lm_head
from edgellm.convert.validate import ValidationSettings
from edgellm.manifest import read_manifest
from edgellm.runtime.session import DecoderSession
from tests.conftest import build_tiny_hf_model

TOKENS = [5, 17, 99, 3, 250, 42, 7, 300, 12, 64, 128, 1, 33, 77, 200, 9]
SETTINGS = ValidationSettings(heldout_tokens=128, window=64, consistency_tokens=16)


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    root = tmp_path_factory.mktemp("untied")
    source = build_tiny_hf_model(root / "hf", seed=3, tied=False)
    folders = {p: convert(str(source), root / p, ConvertOptions(precision=p, gate=False, progress=False,
                                                                   validation=SETTINGS, keep_fp32=True)).out_dir
               for p in ("fp32", "int8")}
    return source, folders


def _logits(folder):
    m = read_manifest(folder)
    session = DecoderSession(folder / "model.onnx", m.io, m.dims, capacity=64, threads=1)
    return session.forward(TOKENS, keep=len(TOKENS)).copy()


def test_the_source_really_is_untied(untied):
    source, _ = untied
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    assert model.config.tie_word_embeddings is False
    assert not torch.equal(model.model.embed_tokens.weight, model.lm_head.weight)


def test_untied_int8_keeps_its_own_embedding_and_tracks_fp32(untied):
    source, folders = untied
    ref, got = _logits(folders["fp32"]), _logits(folders["int8"])
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.1 * scale  # the int8 tolerance of test_export.test_int8_model_tracks_fp32
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
    manifest = read_manifest(folders["int8"])
    assert manifest.quantization["embedding"].startswith("separate Gather table")
    graph = onnx.load(str(folders["int8"] / "model.onnx"))
    assert not any(n.op_type == "GatherBlockQuantized" for n in graph.graph.node)
    embed = next(n for n in graph.graph.node if n.name == "embed")
    table = numpy_helper.to_array(next(t for t in graph.graph.initializer if t.name == embed.input[0]))
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    np.testing.assert_array_equal(table, model.model.embed_tokens.weight.detach().numpy())  # the embedding, not the head
    assert not np.allclose(table, model.lm_head.weight.detach().numpy(), atol=0.05)



def test_the_tie_check_looks_at_values_not_shapes(untied, tiny_int8_dir):
    _, folders = untied
    reference = onnx.load(str(folders["int8"] / "reference" / "model.onnx"))  # the fp32 export kept by --keep-fp32
    assert embedding_equals_lm_head(reference) is False  # same shapes, different values
    # The tied tiny model's manifest says its embedding reads the int8 lm_head (stored once).
    assert "tied" in read_manifest(tiny_int8_dir).quantization["embedding"]
