"""edgellm.runtime.measure on the tiny fp32 model: each helper against an independent computation."""

import sys

import numpy as np
import pytest

import edgellm
from edgellm import InvalidParameterError, SamplingParams
from edgellm.runtime import measure

CHAT = [{"role": "user", "content": "Tell me about the Congress."}]


@pytest.fixture(scope="module")
def llm(tiny_fp32_dir):
    return edgellm.load(tiny_fp32_dir, threads=1)


def test_greedy_equals_the_generator_at_temperature_zero(llm):
    ids = llm.encode(CHAT)
    eos = llm.manifest.generation.eos_token_ids
    llm.reset()
    expected = llm.generate(CHAT, SamplingParams(max_new_tokens=30, temperature=0.0))
    run = measure.greedy(llm.session, ids, 30, eos, record=True)
    llm.reset()
    # The generator drops the EOS token from its output; greedy keeps it (the teacher-forcing check needs it).
    assert [t for t in run.tokens if t not in eos] == list(expected.token_ids)
    assert run.steps == len(run.tokens) - 1 and run.logits.shape == (len(run.tokens), llm.session.vocab_size)
    assert [int(r.argmax()) for r in run.logits] == run.tokens
    top2 = np.sort(run.logits, axis=-1)[:, -2:]
    np.testing.assert_allclose(run.margins, top2[:, 1] - top2[:, 0])
    assert (run.margins >= 0).all()


def test_greedy_reusing_the_cache_gives_the_same_tokens(llm):
    ids = llm.encode(CHAT)
    fresh = measure.greedy(llm.session, ids, 12)
    again = measure.greedy(llm.session, ids, 12, reuse_cache=True)
    llm.reset()
    assert again.reused == len(ids) - 1 and again.tokens == fresh.tokens
    with pytest.raises(InvalidParameterError, match="max_new_tokens=0"):
        measure.greedy(llm.session, ids, 0)


def test_perplexity_matches_softmax_of_the_full_logits(llm):
    tokens = llm.tokenizer.encode("The committee met on Tuesday to discuss the budget for next year.").ids
    score = measure.perplexity(llm.session, tokens, window=len(tokens))
    llm.session.truncate(0)
    logits = llm.session.forward(tokens[:-1], keep=len(tokens) - 1).astype(np.float64)
    llm.reset()
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = np.exp(-np.mean(np.log(probs[np.arange(len(tokens) - 1), tokens[1:]])))
    assert score.tokens == len(tokens) - 1
    assert score.perplexity == pytest.approx(expected, rel=1e-6)
    np.testing.assert_array_equal(score.argmax, logits.argmax(-1))
    # Windows: two halves score the same tokens, each from an empty cache.
    assert measure.perplexity(llm.session, tokens, window=4).tokens == len(tokens) - 1


def test_log_softmax_is_stable_and_normalized():
    x = np.array([[1000.0, 999.0, -1000.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    out = measure.log_softmax(x)
    assert np.isfinite(out).all() and out.dtype == np.float64
    np.testing.assert_allclose(np.exp(out).sum(-1), 1.0)
    np.testing.assert_allclose(out[1], np.log(1 / 3))


def test_kv_consistency_and_decode_probe_on_fp32(llm):
    tokens = llm.encode(CHAT)
    check = measure.kv_consistency(llm.session, tokens)
    assert check.tokens == len(tokens) and check.worst < 1e-3 and check.argmax_match == 1.0
    assert measure.KVConsistency.from_dict(check.to_dict()) == check
    probe = measure.decode_probe(llm.session, tokens, steps=5)
    assert probe.steps == 5 and probe.prompt_tokens == len(tokens) and probe.decode_ms_per_token > 0
    assert llm.session.length == 0


def test_measure_is_torch_free():
    import subprocess

    code = "import sys, edgellm.runtime.measure; print(sorted(m for m in sys.modules if m.startswith(('torch', 'edgellm.convert'))))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
