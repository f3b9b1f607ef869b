"""The real default model on edgellm's own int8 kernels (model.kernels.onnx) against onnxruntime's (model.onnx)."""

from pathlib import Path

import numpy as np
import pytest

import edgellm
from edgellm.convert.kernel_graph import KERNEL_MODEL
from edgellm.convert.validate import CHAT_PROMPTS, chat_agreement
from edgellm.manifest import read_manifest
from edgellm.runtime import measure

pytestmark = pytest.mark.integration


def test_the_default_model_runs_its_kernel_graph_within_the_recorded_limits(default_model_dir):
    from edgellm import kernels

    if kernels.library_path() is None:
        pytest.fail("edgellm's kernel library is not built here. Fix: python -m edgellm.kernels build", pytrace=False)
    on = edgellm.load(default_model_dir, threads=2, kernels=True)  # also on a CPU where auto would not pick it
    off = edgellm.load(default_model_dir, threads=2, kernels=False)
    assert (on.graph.graph, on.graph.kernels, on.graph.isa) == (KERNEL_MODEL, True, kernels.isa())
    assert off.graph.graph == "model.onnx"
    check = on.manifest.validation.kernel_graph  # convert's check, against model.onnx and fp32
    assert check is not None and check.passed and check.kept and check.reference == "fp32"
    limits = check.thresholds
    # Recomputed from the files: the held-out window, teacher-forced through both graphs.
    v = on.manifest.validation
    text = (Path(edgellm.__file__).parent / "data" / v.heldout.text).read_text()
    ids = on.tokenizer.encode(text, add_special_tokens=False).ids[:v.heldout.window]
    a = on.session.forward(ids, keep=len(ids)).copy()
    b = off.session.forward(ids, keep=len(ids)).copy()
    on.reset(), off.reset()
    assert np.abs(a - b).max() <= limits.max_abs_logit_diff
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= limits.min_argmax_match
    # model.onnx's greedy chat replies, teacher-forced through the twin.
    prompts = [on.encode([{"role": "user", "content": q}]) for q in CHAT_PROMPTS[:4]]
    eos = set(on.manifest.generation.eos_token_ids)
    agreement = chat_agreement(off.session, on.session, prompts, eos, 24)
    assert agreement.agreement >= limits.min_argmax_match and agreement.first_token_agreement == 1.0
    # Decoded step by step (one row per call: the kernel's GEMV path): the same reply, or a split at a near-tie.
    for prompt in prompts:
        x, y = (measure.greedy(m.session, prompt, 24, eos).tokens for m in (on, off))
        if x != y:
            split = next(i for i, (s, t) in enumerate(zip(x, y)) if s != t)
            on.reset(), off.reset()
            rows = [m.session.forward(prompt + x[:split], keep=1)[0].copy() for m in (on, off)]
            assert np.abs(rows[0] - rows[1]).max() <= limits.max_abs_logit_diff
            assert np.sort(rows[1])[-1] - np.sort(rows[1])[-2] < limits.max_abs_logit_diff  # it was a near-tie
    on.reset(), off.reset()


HUGEPAGE_PROBE = """
import json, sys
import numpy as np
import edgellm
llm = edgellm.load(sys.argv[1], threads=1, kernels=True)
ids = llm.encode("Name three colours.")
prompt = llm.session.forward(ids, keep=1)[0].copy()  # a prompt (many rows per matmul), then a decode step (one)
logits = np.concatenate([prompt, llm.session.forward([int(prompt.argmax())], keep=1)[0]])
memory = {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/smaps_rollup") if l.endswith(" kB\\n")}
print(json.dumps({"logits": logits.tolist(), "rss_kb": memory["Rss"], "huge_kb": memory.get("AnonHugePages", 0)}))
"""


def test_weights_in_huge_pages_give_the_same_logits_without_growing_memory(default_model_dir):
    """The kernels copy their weights into 2 MB pages at load (weight_arena.h) and hand the file mapping's
    pages back: bit-identical logits, resident memory within 40 MB of reading onnxruntime's mapping."""
    import json
    import os
    import subprocess
    import sys

    def probe(setting: str, pack: str = "1") -> dict:
        env = {**os.environ, "EDGELLM_KERNEL_HUGEPAGES": setting, "EDGELLM_KERNEL_PACK": pack}
        run = subprocess.run([sys.executable, "-c", HUGEPAGE_PROBE, str(default_model_dir)], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    placed, mapped = probe("1"), probe("0")
    assert placed["logits"] == mapped["logits"]
    assert mapped["huge_kb"] < 8 * 1024  # off: no weights in huge pages
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.is_file() and "[never]" not in thp.read_text():
        assert placed["huge_kb"] > 100 * 1024  # ~139 MB of the 146 MB of int8 weights and scales
    assert placed["rss_kb"] < mapped["rss_kb"] + 40 * 1024
    # The packed layout (q8_kernel.c, PACK_PAIR) changes only the order of float additions in each matmul
    # (tests/test_kernels.py bounds that), but across 30 layers a changed sum can flip an activation's int8
    # rounding: against the row kernel on MatMulNBits' layout (EDGELLM_KERNEL_PACK=0) the logits stay within
    # the limit convert recorded for the kernel graph, with the same greedy token after the prompt and the step.
    rows = probe("1", pack="0")
    limit = read_manifest(Path(default_model_dir)).validation.kernel_graph.thresholds.max_abs_logit_diff
    ours, theirs = np.asarray(placed["logits"]).reshape(2, -1), np.asarray(rows["logits"]).reshape(2, -1)
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert 0 < float(np.abs(ours - theirs).max()) <= limit  # 0 would mean EDGELLM_KERNEL_PACK=0 was ignored


def test_one_node_a_layer_gives_the_three_nodes_logits_bit_for_bit(default_model_dir, tmp_path):
    """The shipped twin runs each decoder layer as one ai.edgellm.Q8Layer node; the same twin with each layer as
    MatMulQ8 -> CachedAttention -> Q8Mlp (built here with convert's own passes) gives the same logits, bit for bit,
    on a prompt and on decode steps through the KV cache bound in place."""
    import shutil

    import onnx

    from edgellm import kernels
    from edgellm.convert.fuse_layers import fuse_decoder_layers, replace_attention
    from edgellm.convert.half_scales import halve_scales
    from edgellm.convert.kernel_graph import build_kernel_graph
    from edgellm.runtime.session import DecoderSession

    if kernels.library_path() is None:
        pytest.fail("edgellm's kernel library is not built here. Fix: python -m edgellm.kernels build", pytrace=False)
    folder = tmp_path / "model"
    shutil.copytree(default_model_dir, folder)
    manifest = read_manifest(folder)
    shipped = onnx.load(str(folder / KERNEL_MODEL), load_external_data=False)
    assert [n.op_type for n in shipped.graph.node].count("Q8Layer") == manifest.dims.num_layers == 30
    assert manifest.quantization["kernel_graph"]["layer_nodes"] == 30
    three = build_kernel_graph(onnx.load(str(folder / "model.onnx"), load_external_data=False), fuse=False,
                               rewrite=False)[0]
    halve_scales(three, folder)
    fuse_decoder_layers(three.graph)
    replace_attention(three.graph)
    (folder / "three.onnx").write_bytes(three.SerializeToString())
    assert [n.op_type for n in three.graph.node].count("CachedAttention") == 30

    def session(graph: str) -> DecoderSession:
        return DecoderSession(folder / manifest.files["model"], io=manifest.io, dims=manifest.dims, capacity=128,
                              threads=2, graph=manifest.graph, kernel_path=folder / graph, kernels=True)

    one, split = session(KERNEL_MODEL), session("three.onnx")
    ids = edgellm.load(default_model_dir, kernels=False).encode("Name three colours.")
    a, b = one.forward(ids, keep=len(ids)).copy(), split.forward(ids, keep=len(ids)).copy()
    assert np.array_equal(a, b)
    token = int(a[-1].argmax())
    for _ in range(8):
        a, b = one.forward([token]).copy(), split.forward([token]).copy()
        assert np.array_equal(a, b)
        token = int(a.argmax())
    assert np.abs(a).max() > 1.0  # real logits, not an empty buffer
