"""The exported graph computes what the PyTorch source computes, with and without the KV cache."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from edgellm.manifest import read_manifest
from edgellm.runtime.session import DecoderSession


@pytest.fixture(scope="module")
def torch_model(tiny_hf_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def session(tiny_fp32_dir):
    m = read_manifest(tiny_fp32_dir)
    return DecoderSession(tiny_fp32_dir / "model.onnx", m.io, m.dims, capacity=128, threads=1)


TOKENS = [5, 17, 99, 3, 250, 42, 7, 300, 12, 64, 128, 1, 33, 77, 200, 9]


def test_onnx_logits_match_pytorch(torch_model, session):
    with torch.no_grad():
        expected = torch_model(torch.tensor([TOKENS])).logits[0].numpy()
    session.truncate(0)
    got = session.forward(TOKENS, keep=len(TOKENS))
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4 * max(1.0, np.abs(expected).max())


def test_stepwise_and_chunked_decode_equal_one_pass(session):
    session.truncate(0)
    full = session.forward(TOKENS, keep=len(TOKENS)).copy()
    session.truncate(0)
    steps = np.stack([session.forward([t])[0].copy() for t in TOKENS])
    np.testing.assert_allclose(steps, full, atol=1e-4)
    session.truncate(5)  # roll back, then continue in one chunk: the cache rows past 5 are rewritten
    chunked = session.forward(TOKENS[5:], keep=len(TOKENS) - 5)
    np.testing.assert_allclose(chunked, full[5:], atol=1e-4)


def test_logits_to_keep_gives_the_last_positions(session):
    session.truncate(0)
    full = session.forward(TOKENS, keep=len(TOKENS)).copy()
    session.truncate(0)
    last3 = session.forward(TOKENS, keep=3)
    np.testing.assert_allclose(last3, full[-3:], atol=1e-5)


def test_int8_model_tracks_fp32(tiny_int8_dir, session):
    m = read_manifest(tiny_int8_dir)
    q = DecoderSession(tiny_int8_dir / "model.onnx", m.io, m.dims, capacity=128, threads=1)
    session.truncate(0)
    ref = session.forward(TOKENS, keep=len(TOKENS)).copy()
    got = q.forward(TOKENS, keep=len(TOKENS))
    scale = np.abs(ref).max()
    assert np.abs(got - ref).max() < 0.1 * scale  # int8 noise, not a different function
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.75
    assert q.session.get_providers()[0] == "CPUExecutionProvider"


@pytest.mark.parametrize("threads", [1, 2])
def test_batch_invariant_int8_logits_do_not_depend_on_how_tokens_are_batched(tiny_int8_invariant_dir, threads):
    """Bit for bit: one token at a time, one pass, and chunks after a roll-back give the same logits.

    Speculative decoding relies on this to return exactly what plain decoding returns; without the
    attention pad row, the one-row attention kernel differs in the last bits and int8 rounding
    downstream turns that into visibly different logits (the second test shows it).
    """
    m = read_manifest(tiny_int8_invariant_dir)
    assert m.graph.to_dict() == {"batch_invariant": True, "attention_pad_rows": 1, "target": "cpu", "kv_dtype": "float32"}
    assert m.validation.kv_consistency["int8"].bit_identical is True
    q = DecoderSession(tiny_int8_invariant_dir / "model.onnx", m.io, m.dims, capacity=len(TOKENS), threads=threads,
                       graph=m.graph)
    full = q.forward(TOKENS, keep=len(TOKENS)).copy()
    q.truncate(0)
    steps = np.stack([q.forward([t])[0].copy() for t in TOKENS])  # fills the cache to its capacity
    np.testing.assert_array_equal(steps, full)
    for start, size in [(5, 3), (8, 2), (10, 6)]:
        q.truncate(start)
        np.testing.assert_array_equal(q.forward(TOKENS[start:start + size], keep=size), full[start:start + size])


def test_default_int8_graph_is_not_batch_invariant(tiny_int8_dir):
    """Why --batch-invariant exists: the default (faster) graph's one-token steps differ from one pass."""
    m = read_manifest(tiny_int8_dir)
    assert m.graph.to_dict() == {"batch_invariant": False, "attention_pad_rows": 0, "target": "cpu", "kv_dtype": "float32"}
    assert m.validation.kv_consistency["int8"].bit_identical is False


def test_gate_refuses_a_batch_invariant_claim_the_logits_do_not_keep(tiny_int8_dir):
    from dataclasses import replace

    from edgellm.validation import Thresholds, gate_failures

    report = read_manifest(tiny_int8_dir).validation
    assert not any("batch-invariant" in f for f in gate_failures(report, Thresholds()))
    claimed = replace(report, batch_invariant=True)  # as if built with the pad row, yet stepwise != one pass
    assert any("built batch-invariant" in f for f in gate_failures(claimed, Thresholds()))
