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
