"""The default model at --precision int4: passes the stated int4 gate, answers like int8, loads torch-free."""

import json

import pytest

import edgellm
from edgellm import SamplingParams
from edgellm.convert.validate import INT4_THRESHOLDS

from ..conftest import generate_in_fresh_process

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_int4_manifest_states_and_passes_its_gate(default_int4_dir):
    m = json.loads((default_int4_dir / "edgellm.json").read_text())
    v = m["validation"]
    assert m["precision"] == "int4" and m["quantization"]["accuracy_level"] == 4
    assert v["gate"]["passed"] and v["gate"]["enforced"]
    assert v["gate"]["thresholds"] == INT4_THRESHOLDS.to_dict()
    assert v["perplexity_ratio"] <= INT4_THRESHOLDS.max_ppl_ratio
    assert v["greedy_agreement"] >= INT4_THRESHOLDS.min_agreement
    assert "lm_head" in m["quantization"]["int8_layers"] and m["quantization"]["layers_4bit"] >= 70
    # int8 is 24% of fp32 (README "Why this int8 scheme"); int4 keeps the lm_head and a quarter of the rest 8-bit
    assert v["sizes_bytes"]["int4_over_fp32"] < 0.21


def test_int4_answers_and_never_imports_torch(default_int4_dir):
    got = generate_in_fresh_process(default_int4_dir, QUESTION, threads=2, max_new_tokens=24, temperature=0.0)
    assert "Paris" in got["text"]
    assert got["heavy_modules"] == []


def test_int4_stream_equals_generate(default_int4_dir):
    llm = edgellm.load(default_int4_dir, threads=2)
    params = SamplingParams(max_new_tokens=16, temperature=0.7, seed=3)
    llm.reset()
    whole = llm.generate(QUESTION, params)
    llm.reset()
    stream = llm.stream(QUESTION, params)
    assert "".join(c.text for c in stream) == whole.text and stream.result.token_ids == whole.token_ids


def _gguf_blocks(name: str):
    """(d, m, nibbles) of the shipped GGUF's Q4_1 tensor `name`: [rows, blocks] fp16 twice, [rows, blocks, 16]."""
    import gguf
    import numpy as np

    from edgellm.convert.sources import DEFAULT_MODEL, resolve_source

    reader = gguf.GGUFReader(resolve_source(DEFAULT_MODEL).path)
    tensor = next(t for t in reader.tensors if t.name == name)
    assert tensor.tensor_type.name == "Q4_1", tensor.tensor_type
    rows = int(tensor.shape[-1])
    raw = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, -1, 20)  # per block: d, m (fp16), 16 bytes
    return raw[..., 0:2].copy().view(np.float16)[..., 0], raw[..., 2:4].copy().view(np.float16)[..., 0], raw[..., 4:]


def test_int4_twin_runs_the_shipped_q4_1_blocks_bit_for_bit(default_int4_dir):
    """The kernel twin's 4-bit layers are the GGUF's own Q4_1 blocks, byte for byte (gate rows first in gate_up);
    its check against fp32 passed, closer to fp32 than model.onnx's requantized int4."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    m = json.loads((default_int4_dir / "edgellm.json").read_text())
    info, v = m["quantization"]["kernel_graph"], m["validation"]
    assert info["four_bit_nodes"] == 30 * 4 and info["four_bit_exact"] == 1.0
    assert v["kernel_graph"]["passed"] and v["kernel_graph"]["kept"]
    assert v["kernel_graph"]["perplexity_ratio"] <= 1.01 < v["perplexity_ratio"]
    assert v["kernel_graph"]["greedy_agreement"] >= 0.95 > v["greedy_agreement"]
    twin = onnx.load(str(default_int4_dir / "model.kernels.onnx"), load_external_data=False)
    tensors = {t.name: t for t in twin.graph.initializer}
    for ours, theirs, rows in (("layers.0/down_proj", "blk.0.ffn_down.weight", slice(None)),
                               ("layers.17/gate_up_proj", "blk.17.ffn_gate.weight", slice(0, 1536))):
        nibbles = numpy_helper.to_array(tensors[f"{ours}.q4"], base_dir=str(default_int4_dir))[rows]
        dm = numpy_helper.to_array(tensors[f"{ours}.q4_dm"], base_dir=str(default_int4_dir))[rows]
        d, mn, qs = _gguf_blocks(theirs)
        assert np.array_equal(nibbles, qs), ours
        assert np.array_equal(dm[..., 0].view(np.uint16), d.view(np.uint16)), ours
        assert np.array_equal(dm[..., 1].view(np.uint16), mn.view(np.uint16)), ours


def test_int4_runs_its_kernel_twin(default_int4_dir, kernel_library):
    llm = edgellm.load(default_int4_dir, threads=2)
    assert llm.graph.kernels and llm.graph.path.name == "model.kernels.onnx", llm.graph.reason
    reply = llm.generate(QUESTION, SamplingParams(max_new_tokens=24, temperature=0.0))
    assert "Paris" in reply.text
