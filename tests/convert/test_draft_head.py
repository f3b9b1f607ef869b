"""Draft-only heads (convert --draft-head): the kept logits are the full model's, the rest are -inf,
and drafting with such a model still returns exactly what plain decoding returns."""

from __future__ import annotations

import numpy as np
import pytest

import edgellm
from edgellm.convert.draft_head import rank_tokens
from edgellm.errors import InvalidParameterError
from edgellm.manifest import read_manifest
from edgellm.runtime.speculative import SpeculativeConfig, enable_speculation

HEAD = 256  # of the tiny model's 384 tokens
TOKENS = [5, 17, 99, 3, 250, 42, 7, 300, 12, 64, 128, 1, 33, 77, 200, 9]


@pytest.fixture(scope="module")
def head_dir(tiny_hf_dir, tmp_path_factory):
    from edgellm.convert.pipeline import ConvertOptions, convert
    from edgellm.convert.validate import ValidationSettings

    out = tmp_path_factory.mktemp("tiny-draft-head") / "model"
    settings = ValidationSettings(heldout_tokens=256, window=128, consistency_tokens=24)
    convert(str(tiny_hf_dir), out, ConvertOptions(gate=False, progress=False, validation=settings, draft_head=HEAD))
    return out


def test_rank_tokens_keeps_the_most_frequent_and_the_required():
    ids = rank_tokens([[5, 5, 5, 7, 7, 9], [9, 9, 9, 9, 3]], size=3, vocab_size=200, always=[100])
    assert ids.tolist() == [5, 9, 100]  # 9 (5x) and 5 (3x) beat 7 (2x); 100 is required; sorted ascending
    assert rank_tokens([[2, 1, 1, 2]], size=1, vocab_size=10).tolist() == [1]  # a tie goes to the smaller id
    assert rank_tokens([[7, 7, 3]], size=4, vocab_size=10).tolist() == [0, 1, 3, 7]  # then unseen ids from 0
    assert len(rank_tokens([[1]], size=50, vocab_size=10)) == 10


def test_head_folder_records_its_tokens_and_checks_them(head_dir):
    m = read_manifest(head_dir)
    head = np.load(head_dir / m.graph.head_tokens)
    assert len(head) == HEAD and m.files["head_tokens"] in m.checksums
    assert set(m.generation.eos_token_ids) <= set(head.tolist())
    report = m.validation.draft_head
    assert report.tokens == HEAD and 0.5 < report.heldout_coverage <= 1.0


@pytest.mark.parametrize("kernels", [False, None], ids=["onnxruntime", "kernel-twin"])
def test_kept_logits_equal_the_full_models_and_the_rest_are_minus_inf(head_dir, tiny_int8_dir, kernels):
    head = np.load(head_dir / read_manifest(head_dir).graph.head_tokens)
    full_llm = edgellm.load(tiny_int8_dir, threads=1, kernels=kernels)
    head_llm = edgellm.load(head_dir, threads=1, kernels=kernels)
    assert head_llm.session.choice.kernels == full_llm.session.choice.kernels
    full = full_llm.session.forward(TOKENS, keep=4).copy()
    got = head_llm.session.forward(TOKENS, keep=4)
    np.testing.assert_allclose(got[:, head], full[:, head], rtol=0, atol=1e-5)
    outside = np.setdiff1d(np.arange(full.shape[-1]), head)
    assert np.isneginf(got[:, outside]).all()


def test_a_head_folder_has_a_kernel_twin_checked_on_both_heads(head_dir):
    """The twin is checked with the whole head (perplexity, agreement, KV) and again, rebuilt, on the restricted
    head's columns; the folder runs it where the kernel library runs."""
    from edgellm.convert.kernel_graph import KERNEL_MODEL, library_reason

    m = read_manifest(head_dir)
    assert m.files["kernel_model"] == KERNEL_MODEL and KERNEL_MODEL in m.checksums
    if library_reason() is not None:  # no kernel library: written unchecked, as for a whole-head folder
        assert m.quantization["kernel_graph"]["checked"] is False
        return
    checked = m.validation.kernel_graph
    assert checked.passed and checked.kept, checked.failures
    assert np.isfinite(checked.max_abs_logit_diff)
    assert checked.max_abs_logit_diff <= checked.thresholds.max_abs_logit_diff
    # the whole-head check's held-out window plus the restricted one's: twice the gate's window at least
    assert checked.positions >= 2 * 128
    assert set(checked.decode_ms_per_token) == {"model.onnx", KERNEL_MODEL}
    assert edgellm.load(head_dir, threads=1).session.choice.kernels


def test_a_head_that_is_not_the_twins_counts_as_an_infinite_difference(head_dir, tiny_int8_dir):
    """A twin whose logits are not finite where model.onnx's are fails the logit limit instead of passing as NaN."""
    from edgellm.convert.kernel_graph import _compare_logits

    full = edgellm.load(tiny_int8_dir, threads=1, kernels=False).session
    head = edgellm.load(head_dir, threads=1, kernels=False).session
    diff, same, positions = _compare_logits(full, head, [(TOKENS, 4)])
    assert diff == float("inf") and positions == len(TOKENS) - 4
    assert _compare_logits(head, head, [(TOKENS, 4)])[0] == 0.0


def test_drafting_with_a_head_model_is_exact(head_dir, tiny_int8_invariant_dir):
    params = edgellm.SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    prompts = [[{"role": "user", "content": "Turn on the kitchen light."}], "the cat sat on the mat, the cat"]
    teacher = edgellm.load(tiny_int8_invariant_dir, threads=1)
    expected = [teacher.generate(p, params).token_ids for p in prompts]
    session = enable_speculation(teacher, edgellm.load(head_dir, threads=1), SpeculativeConfig(max_draft=3,
                                                                                                adaptive=False))
    assert [teacher.generate(p, params).token_ids for p in prompts] == expected
    assert session.stats.drafted > 0


def test_a_too_small_head_is_refused():
    from edgellm.convert.pipeline import ConvertOptions

    with pytest.raises(InvalidParameterError, match="draft_head=16"):
        ConvertOptions(draft_head=16)


def test_cli_info_describes_the_head_and_batch_invariance(head_dir, tiny_int8_invariant_dir):
    from click.testing import CliRunner

    from edgellm.cli import main

    head = CliRunner().invoke(main, ["info", str(head_dir), "--verify"])
    assert head.exit_code == 0, head.output
    assert f"draft head: {HEAD} of 384 tokens" in head.output and "batch-invariant" not in head.output
    invariant = CliRunner().invoke(main, ["info", str(tiny_int8_invariant_dir)])
    assert "batch-invariant: logits do not depend" in invariant.output and "draft head" not in invariant.output
