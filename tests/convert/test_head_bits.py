"""--head-bits 4: a 4-bit lm_head whose largest logits are recomputed from the int8 embedding rows."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from edgellm.convert.pipeline import ConvertOptions, convert
from edgellm.convert.quantize import quantize_int8, quantize_lm_head, rescore_lm_head_top_k
from edgellm.convert.validate import ValidationSettings
from edgellm.errors import InvalidParameterError

from ..conftest import build_tiny_hf_model, generate_in_fresh_process

SETTINGS = ValidationSettings(heldout_tokens=256, window=128, consistency_tokens=24)
V, K, S, TOP_K = 300, 64, 5, 8


def _head_graph(table: np.ndarray) -> onnx.ModelProto:
    """ids -> Gather "embed" -> emb; x -> MatMul "lm_head" (the table transposed, tied) -> lm_head/out0."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["x", "head"], ["lm_head/out0"], name="lm_head")]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, S]),
                        helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, S, K])],
        [helper.make_tensor_value_info("emb", onnx.TensorProto.FLOAT, [1, S, K]),
         helper.make_tensor_value_info("lm_head/out0", onnx.TensorProto.FLOAT, [1, S, V])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(np.ascontiguousarray(table.T), "head")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def test_rescoring_recomputes_exactly_the_top_logits_from_the_int8_rows():
    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, K)).astype(np.float32)
    feeds = {"ids": rng.integers(0, V, (1, S)), "x": rng.standard_normal((1, S, K)).astype(np.float32)}
    int8 = quantize_int8(_head_graph(table), tied=True)
    emb8, _ = _run(int8, feeds)
    head4 = quantize_lm_head(quantize_int8(_head_graph(table), tied=True), table.T, 4, 32, "rtn")
    emb4, approx = _run(head4, feeds)
    np.testing.assert_array_equal(emb4, emb8)  # the embedding still reads the int8 table
    rescored_model = rescore_lm_head_top_k(quantize_lm_head(quantize_int8(_head_graph(table), tied=True), table.T,
                                                            4, 32, "rtn"), TOP_K)
    _, rescored = _run(rescored_model, feeds)
    # every int8 row, dequantized, through the embedding Gather itself
    all_rows = np.concatenate([_run(int8, {"ids": np.arange(i, i + S).reshape(1, S) % V, "x": feeds["x"]})[0][0]
                               for i in range(0, V, S)])[:V]
    exact = feeds["x"][0] @ all_rows.T                               # (S, V) int8 weights, fp32 math
    for p in range(S):
        order = np.argsort(-approx[0, p])
        top, blend, rest = order[:TOP_K], order[TOP_K:2 * TOP_K], order[2 * TOP_K:]
        np.testing.assert_allclose(rescored[0, p, top], exact[p, top], rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(rescored[0, p, rest], approx[0, p, rest])
        assert np.abs(approx[0, p, top] - exact[p, top]).max() > 1e-3  # the 4-bit values did differ
        # the next TOP_K: int8 weight falling linearly from 1 at the TOP_K-th 4-bit logit to 0 at the 2*TOP_K-th
        hi, lo = approx[0, p, order[TOP_K - 1]], approx[0, p, order[2 * TOP_K - 1]]
        w = (approx[0, p, blend] - lo) / (hi - lo)
        np.testing.assert_allclose(rescored[0, p, blend], approx[0, p, blend] + w * (exact[p, blend] - approx[0, p, blend]),
                                   rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def tiny_head4_dir(tiny_hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-head4") / "model"
    convert(str(tiny_hf_dir), out, ConvertOptions(precision="int8", head_bits=4, progress=False,
                                                  validation=SETTINGS))  # gated, the int8 limits unchanged
    return out


def test_head_bits_4_converts_passes_the_int8_gate_and_records_it(tiny_head4_dir):
    manifest = json.loads((tiny_head4_dir / "edgellm.json").read_text())
    v = manifest["validation"]
    assert v["gate"]["passed"] and v["gate"]["enforced"]
    assert v["gate"]["thresholds"]["max_ppl_ratio"] == 1.03 and v["gate"]["thresholds"]["min_agreement"] == 0.90
    head = manifest["quantization"]["lm_head"]
    assert head["bits"] == 4 and head["block_size"] == 32 and head["rescore_top_k"] == 128
    graph = onnx.load(str(tiny_head4_dir / "model.onnx"), load_external_data=False).graph
    lm_head = next(n for n in graph.node if n.name == "lm_head_Q4")
    assert {a.name: a.i for a in lm_head.attribute}["bits"] == 4
    top = next(n for n in graph.node if n.op_type == "TopK")
    k = next(numpy_helper.to_array(t) for t in graph.initializer if t.name == top.input[1])
    assert k.tolist() == [2 * min(128, manifest["dims"]["vocab_size"] // 2)]
    assert sum(n.op_type == "GatherBlockQuantized" for n in graph.node) == 2  # the embedding and the rescoring


def test_head_bits_4_loads_and_generates_torch_free(tiny_head4_dir):
    got = generate_in_fresh_process(tiny_head4_dir, "hello there", threads=1, max_new_tokens=8, ignore_eos=True)
    assert len(got["token_ids"]) == 8, got
    assert got["heavy_modules"] == []


def test_head_bits_4_refuses_an_untied_source(tmp_path):
    untied = build_tiny_hf_model(tmp_path / "untied", tied=False)
    with pytest.raises(InvalidParameterError, match="does not tie"):
        convert(str(untied), tmp_path / "x", ConvertOptions(precision="int8", head_bits=4, progress=False,
                                                             validation=SETTINGS))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("options", [dict(head_bits=6), dict(head_bits=4, precision="fp32"),
                                     dict(head_bits=4, batch_invariant=True), dict(head_bits=4, target="cuda")])
def test_head_bits_refuses_what_it_was_not_built_for(options):
    with pytest.raises(InvalidParameterError, match="head"):
        ConvertOptions(**options)
