"""convert --prefill-graph: a QGEMM twin of the int8 graph that the runtime runs prompts through."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import edgellm
from edgellm.convert.pipeline import ConvertOptions, convert
from edgellm.convert.validate import ValidationSettings
from edgellm.errors import InvalidParameterError
from edgellm.runtime.session import PREFILL_GRAPH_MIN_TOKENS

SETTINGS = ValidationSettings(heldout_tokens=256, window=128, consistency_tokens=24)


@pytest.fixture(scope="module")
def prefill_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-prefill") / "model"
    # gate off as for every tiny int8 fixture (a random model's int8 ppl drifts more than a trained one's);
    # the real model's gate is in the README run.
    convert(str(request.getfixturevalue("tiny_hf_dir")), out,
            ConvertOptions(precision="int8", gate=False, progress=False, validation=SETTINGS, prefill_graph=True))
    return out


class CountingSession:
    """Wraps an InferenceSession and counts its runs."""

    def __init__(self, inner) -> None:
        self.inner, self.runs = inner, 0

    def run_with_iobinding(self, binding, *args):
        self.runs += 1
        return self.inner.run_with_iobinding(binding, *args)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_the_folder_has_a_checked_qgemm_prefill_graph(prefill_dir):
    manifest = json.loads((prefill_dir / "edgellm.json").read_text())
    assert manifest["files"]["prefill_model"] == "prefill.onnx"
    assert {"prefill.onnx", "prefill.onnx.data"} <= set(manifest["checksums"])
    assert manifest["quantization"]["prefill_graph"]["min_tokens"] == PREFILL_GRAPH_MIN_TOKENS
    v = manifest["validation"]
    assert v["sizes_bytes"]["int8_prefill_graph"] > 0
    # The gate checks each graph's own KV cache handling (one pass vs step by step), both within the int8 limit.
    for name in ("int8", "int8_prefill_graph"):
        kv = v["kv_consistency"][name]
        assert kv["tokens"] == SETTINGS.consistency_tokens and max(kv["max_abs_diff_stepwise"],
                                                                  kv["max_abs_diff_chunked"]) < 2.5
    ops = [n.op_type for n in onnx.load(str(prefill_dir / "prefill.onnx"), load_external_data=False).graph.node]
    layers = manifest["dims"]["num_layers"]
    assert ops.count("MatMulIntegerToFloat") == 4 * layers  # qkv, o, gate_up, down in every block
    assert ops.count("MatMulNBits") == 1  # the lm_head


def test_prompts_run_on_the_prefill_graph_and_steps_on_the_decode_graph(prefill_dir):
    llm = edgellm.load(prefill_dir, threads=1)
    session = llm.session
    assert session.prefill_session is not None
    decode, prefill = CountingSession(session.session), CountingSession(session.prefill_session)
    session.session, session.prefill_session = decode, prefill
    prompt = list(range(10, 10 + 3 * PREFILL_GRAPH_MIN_TOKENS))
    params = edgellm.SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
    result = llm.generate(prompt, params)
    assert (prefill.runs, decode.runs) == (1, 5)
    # A short prompt (below the threshold) stays on the decode graph.
    llm.reset()
    llm.generate(prompt[:PREFILL_GRAPH_MIN_TOKENS - 1], params)
    assert (prefill.runs, decode.runs) == (1, 11)
    # Both graphs share one KV cache: the prefill graph's prompt logits match the decode graph run token by token.
    llm.reset()
    one_pass = session.forward(prompt, keep=len(prompt)).copy()
    llm.reset()
    stepwise = np.stack([session.forward([t], keep=1)[0].copy() for t in prompt])
    # (measured on this random model: correlation 0.9994, max difference 4% of the largest logit, argmax 21/24:
    # a random model has near-ties everywhere; wrong scales or a transposed weight give correlation ~0)
    assert np.corrcoef(one_pass.ravel(), stepwise.ravel())[0, 1] > 0.99
    assert np.abs(one_pass - stepwise).max() < 0.1 * np.abs(stepwise).max()
    assert (one_pass.argmax(-1) == stepwise.argmax(-1)).mean() >= 0.75
    # Streaming and generate agree token for token and in text.
    llm.reset()
    stream = llm.stream(prompt, params)
    text = "".join(chunk.text for chunk in stream)
    assert stream.result.token_ids == result.token_ids and text == result.text


def test_info_names_the_prefill_graph(prefill_dir):
    from click.testing import CliRunner

    from edgellm.cli import main

    out = CliRunner().invoke(main, ["info", str(prefill_dir)])
    assert out.exit_code == 0, out.output
    assert "prefill graph: prefill.onnx runs prompts" in out.output and "KV consistency" in out.output


def test_the_prefill_graph_loads_without_torch(prefill_dir):
    code = ("import sys, edgellm; llm = edgellm.load(sys.argv[1], threads=1); "
            "assert llm.session.prefill_session is not None; "
            "llm.generate(list(range(10, 40)), edgellm.SamplingParams(max_new_tokens=3)); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    run = subprocess.run([sys.executable, "-c", code, str(prefill_dir)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("options", [dict(precision="int4"), dict(precision="fp32"), dict(batch_invariant=True),
                                     dict(target="cuda", precision="fp16")])
def test_prefill_graph_is_refused_where_it_is_not_built(options):
    with pytest.raises(InvalidParameterError, match="--prefill-graph"):
        ConvertOptions(prefill_graph=True, **options)
