"""Distillation on a tiny random Llama: pruning copies weights exactly, KD training improves the student,
resume continues where it stopped, and the saved folder loads back as the same model."""

from __future__ import annotations

import json

import pytest
import torch

import edgellm
from edgellm.convert.distill import DistillConfig, distill, kd_loss
from edgellm.convert.prune import (PrunePlan, ShapeMismatchError, _only_layers, copy_weights, init_student,
                                   make_plan, student_state_dict, uniform_layers)
from edgellm.errors import InvalidParameterError, OutputExistsError

from ..conftest import CHAT_TEMPLATE, build_tiny_tokenizer

# No skip when the [data] extra is missing (scripts/setup.sh installs it): the corpus loaders raise
# MissingDependencyError with the pip line, so the suite fails saying how to fix it.
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=build_tiny_tokenizer(), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@pytest.fixture(scope="module")
def teacher(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so the teacher's argmax is not noise
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return model


def tiny_config(**overrides) -> DistillConfig:
    base = dict(keep_layers=2, layer_method="uniform", steps=30, batch_size=4, block_size=64, lr=3e-3,
                warmup_steps=2, alpha_ce=0.0, seqkd_prompts=16, seqkd_max_new_tokens=16, eval_reply_prompts=8,
                sources=("chatterbot",), calib_tokens=256, eval_tokens=1024, checkpoint_every=10,
                train_embeddings=True)
    base.update(overrides)
    return DistillConfig(**base)


def test_keeping_every_layer_reproduces_the_teacher(teacher):
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    plan = PrunePlan(layers=(0, 1, 2, 3), intermediate_size=128)
    student = init_student(teacher, plan).eval()
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def test_pruned_student_equals_the_teacher_run_on_the_same_layers(teacher):
    ids = torch.randint(0, teacher.config.vocab_size, (2, 16))
    student = init_student(teacher, PrunePlan(layers=(0, 3), intermediate_size=128)).eval()
    assert student.config.num_hidden_layers == 2
    with torch.no_grad(), _only_layers(teacher, [0, 3]):
        expected = teacher(ids).logits
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, expected, rtol=0, atol=1e-6)


def test_mlp_narrowing_with_every_neuron_is_exact_and_a_narrow_one_has_the_right_shapes(teacher):
    ids = torch.randint(0, teacher.config.vocab_size, (1, 12))
    shuffled = tuple(tuple(sorted(torch.randperm(128).tolist())) for _ in range(2))
    full = init_student(teacher, PrunePlan((1, 2), 128, shuffled)).eval()
    with torch.no_grad(), _only_layers(teacher, [1, 2]):
        torch.testing.assert_close(full(ids).logits, teacher(ids).logits, rtol=0, atol=1e-5)
    plan = make_plan(teacher, [ids], 2, "uniform", intermediate_size=48)
    narrow = init_student(teacher, plan)
    assert narrow.model.layers[0].mlp.gate_proj.weight.shape == (48, 64)
    assert narrow.model.layers[1].mlp.down_proj.weight.shape == (64, 48)
    assert all(len(n) == 48 for n in plan.neurons)


def test_copy_weights_names_every_shape_mismatch(teacher):
    student = init_student(teacher, PrunePlan((0, 3), 128))
    state = student_state_dict(teacher.state_dict(), PrunePlan((0, 3), 128))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(100, 64)
    del state["model.norm.weight"]
    with pytest.raises(ShapeMismatchError) as err:
        copy_weights(student, state)
    message = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight: student (128, 64) vs source (100, 64)" in message
    assert "missing in source: model.norm.weight" in message


def test_layer_selection(teacher):
    assert uniform_layers(30, 10) == (0, 3, 6, 10, 13, 16, 19, 23, 26, 29)
    ids = [torch.randint(0, teacher.config.vocab_size, (2, 32))]
    for method in ("loss", "block_influence"):
        plan = make_plan(teacher, ids, 3, method)
        assert len(plan.layers) == 3 and plan.layers[0] == 0 and plan.layers[-1] == 3
    with pytest.raises(InvalidParameterError, match="cannot keep 9 of 4"):
        make_plan(teacher, ids, 9, "uniform")


def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    _, kd, _ = kd_loss(logits, logits, ids, temperature=2.0, alpha_ce=0.5)
    assert kd.abs().item() < 1e-6
    _, kd, _ = kd_loss(torch.randn(2, 5, 11), logits, ids, temperature=2.0, alpha_ce=0.5)
    assert kd.item() > 0.01


def test_distillation_lowers_kd_loss_and_raises_agreement(teacher, tokenizer, tmp_path):
    report = distill(teacher, tokenizer, tiny_config(), tmp_path / "student", device="cpu", progress=False)
    losses = [loss for _, loss in report.loss_history]
    assert len(losses) == 30 and report.tokens_seen == 30 * 4 * 64
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
    assert report.student.kl < 0.7 * report.student_init.kl
    assert report.student.agreement > report.student_init.agreement + 0.03
    assert report.teacher.agreement == 1.0 and report.teacher_replies > 0
    assert report.student_on_replies.agreement > report.student_init_on_replies.agreement

    # The folder is a plain Hugging Face model that reloads as the trained student.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "student"
    saved = json.loads((out / "distill_report.json").read_text())
    assert saved["plan"]["layers"] == [0, 3]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert reloaded.config.num_hidden_layers == 2 and "quantization_config" not in reloaded.config.to_dict()
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
    assert not (out / "checkpoint").exists()

    # ... which `edgellm convert` exports like any other source.
    from edgellm.convert.pipeline import ConvertOptions, convert
    from edgellm.convert.validate import ValidationSettings

    settings = ValidationSettings(heldout_tokens=128, window=64, consistency_tokens=8)
    convert(str(out), tmp_path / "onnx", ConvertOptions(precision="fp32", gate=False, progress=False,
                                                        validation=settings))
    llm = edgellm.load(tmp_path / "onnx", threads=1)
    assert llm.manifest.dims.num_layers == 2
    assert llm.generate("hello", edgellm.SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
                        ).timings.generated_tokens == 4

    with pytest.raises(OutputExistsError, match="--resume"):
        distill(teacher, tokenizer, tiny_config(), out, device="cpu", progress=False)


def test_resume_continues_exactly(teacher, tokenizer, tmp_path):
    constant = dict(warmup_steps=0, min_lr_ratio=1.0, keep_checkpoint=True, steps=4, checkpoint_every=2,
                    seqkd_prompts=0, eval_reply_prompts=0)
    straight = distill(teacher, tokenizer, tiny_config(**constant), tmp_path / "a", device="cpu", progress=False)
    distill(teacher, tokenizer, tiny_config(**{**constant, "steps": 2}), tmp_path / "b", device="cpu", progress=False)
    resumed = distill(teacher, tokenizer, tiny_config(**constant), tmp_path / "b", resume=True, device="cpu",
                      progress=False)
    assert resumed.tokens_seen == straight.tokens_seen
    assert [s for s, _ in resumed.loss_history] == [1, 2, 3, 4]
    assert [x for _, x in resumed.loss_history] == pytest.approx([x for _, x in straight.loss_history], abs=1e-4)
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)

    with pytest.raises(InvalidParameterError, match="lr: checkpoint"):
        distill(teacher, tokenizer, tiny_config(**{**constant, "lr": 1e-3}), tmp_path / "b", resume=True,
                device="cpu", progress=False)


def test_a_student_can_be_pruned_again(teacher, tokenizer, tmp_path):
    """prune → distill → prune: stage 2 starts from stage 1's weights (all layers kept: same scores)."""
    stage1 = distill(teacher, tokenizer, tiny_config(steps=6, seqkd_prompts=0, eval_reply_prompts=0),
                     tmp_path / "s1", device="cpu", progress=False)
    from transformers import AutoModelForCausalLM

    previous = AutoModelForCausalLM.from_pretrained(tmp_path / "s1").eval()
    same = distill(teacher, tokenizer, tiny_config(steps=1, keep_layers=None, seqkd_prompts=0, eval_reply_prompts=0),
                   tmp_path / "s2", device="cpu", progress=False, init_from=previous)
    assert same.student_init.kl == pytest.approx(stage1.student.kl, rel=1e-5)
    narrow = distill(teacher, tokenizer, tiny_config(steps=1, keep_layers=None, intermediate_size=64, seqkd_prompts=0,
                                                     eval_reply_prompts=0),
                     tmp_path / "s3", device="cpu", progress=False, init_from=previous)
    assert narrow.plan["intermediate_size"] == 64 and narrow.student_params < stage1.student_params
