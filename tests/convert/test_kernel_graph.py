"""model.kernels.onnx: the int8 graph's twin on edgellm's own kernels — written by convert, picked by load.

The tests that run the twin need the kernel library (edgellm.kernels, built by scripts/setup.sh); where it is not
built they fail, naming the fix, rather than skip: CI builds it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import edgellm
from edgellm.convert.kernel_graph import DOMAIN, KERNEL_MODEL, OP_TYPE, build_kernel_graph
from edgellm.convert.pipeline import ConvertOptions, convert
from edgellm.convert.validate import ValidationSettings
from edgellm.errors import InvalidParameterError, KernelError, ModelFormatError
from edgellm.manifest import fingerprint, read_manifest, verify_checksums
from edgellm.validation import KernelThresholds
KERNEL_ENV = "EDGELLM_KERNELS"
SETTINGS = ValidationSettings(heldout_tokens=256, window=128, consistency_tokens=24)
PROMPTS = [list(range(10, 30)), list(range(40, 47)), [1, 200, 17, 300, 5, 99, 120, 250, 33, 8, 64]]


def kernel_library() -> str:
    """The built library's ISA; fails (not skips) where it is not built."""
    from edgellm import kernels

    if kernels.library_path() is None:
        pytest.fail("edgellm's kernel library is not built here. Fix: python -m edgellm.kernels build "
                    "(scripts/setup.sh runs it)", pytrace=False)
    return kernels.isa()


@pytest.fixture(scope="module")
def plain_dir(request, tmp_path_factory) -> Path:
    """The tiny int8 model converted with --no-kernel-graph."""
    out = tmp_path_factory.mktemp("tiny-no-kernels") / "model"
    convert(str(request.getfixturevalue("tiny_hf_dir")), out,
            ConvertOptions(precision="int8", gate=False, progress=False, validation=SETTINGS, kernel_graph=False))
    return out


@pytest.fixture
def copy(tiny_int8_dir, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_int8_dir, target)
    return target


def _node(name, k, n, bits=8, block=32, extra=()):
    return helper.make_node("MatMulNBits", ["a", f"{name}.w", f"{name}.s", *extra], [f"{name}.y"], name=name,
                            domain="com.microsoft", K=k, N=n, bits=bits, block_size=block, accuracy_level=4)


def test_only_the_nodes_the_kernel_covers_are_rewritten():
    nodes = [_node("ok", 64, 8), _node("four_bit", 64, 8, bits=4), _node("block64", 64, 8, block=64),
             _node("zero_points", 64, 8, extra=("zp",)), _node("k_not_32", 48, 8), _node("ok_empty_extra", 96, 8,
                                                                                        extra=("", ""))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 64])], [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    twin, converted, left, fused = build_kernel_graph(model, rewrite=False)  # no weights here to halve
    kinds = {n.name: (n.domain, n.op_type) for n in twin.graph.node}
    assert (converted, left, fused) == (2, 4, 0)  # no decoder layer tail to fold here
    assert kinds["ok"] == kinds["ok_empty_extra"] == (DOMAIN, OP_TYPE)
    assert all(kinds[n] == ("com.microsoft", "MatMulNBits") for n in ("four_bit", "block64", "zero_points", "k_not_32"))
    ok = next(n for n in twin.graph.node if n.name == "ok")
    assert {a.name: helper.get_attribute_value(a) for a in ok.attribute} == {"K": 64, "N": 8, "bits": 8,
                                                                           "block_size": 32}
    assert list(ok.input) == ["a", "ok.w", "ok.s"] and list(ok.output) == ["ok.y"]
    assert any(o.domain == DOMAIN for o in twin.opset_import)
    assert [n.op_type for n in model.graph.node].count("MatMulNBits") == 6  # the source is left as it was
    with pytest.raises(ModelFormatError, match="nothing for edgellm's kernels to run"):
        build_kernel_graph(helper.make_model(helper.make_graph(nodes[1:2], "g", [], [])))


def test_convert_writes_the_twin_sharing_the_weights(tiny_int8_dir):
    m = read_manifest(tiny_int8_dir)
    assert m.files["kernel_model"] == KERNEL_MODEL and KERNEL_MODEL in m.checksums
    verify_checksums(tiny_int8_dir, m)
    standard = onnx.load(str(tiny_int8_dir / "model.onnx"), load_external_data=False)
    twin = onnx.load(str(tiny_int8_dir / KERNEL_MODEL), load_external_data=False)
    matmuls = [n for n in standard.graph.node if n.op_type == "MatMulNBits"]
    info = m.quantization["kernel_graph"]
    assert info["nodes"] == len(matmuls) == 2 * 4 + 1 and info["matmulnbits_left"] == 0  # 4 per block + lm_head
    # Before folding, node for node the same graph: names, inputs and outputs; only the MatMuls' op changes.
    unfused = build_kernel_graph(standard, fuse=False, rewrite=False)[0]
    assert [(n.name, list(n.input), list(n.output)) for n in unfused.graph.node] == \
        [(n.name, list(n.input), list(n.output)) for n in standard.graph.node]
    assert [n.op_type for n in unfused.graph.node if n.domain == DOMAIN] == [OP_TYPE] * len(matmuls)
    # Written: every layer's o_proj..next-norm tail folded like Q8Mlp, attention as CachedAttention, and then each
    # layer's qkv, attention and tail as one Q8Layer; the lm_head stays MatMulQ8; every edgellm op reads fp16 scales
    # embedded in the twin.
    ops = [n.op_type for n in twin.graph.node]
    assert info["fused_layers"] == 2 and info["layer_nodes"] == ops.count("Q8Layer") == 2
    assert ops.count(OP_TYPE) == 1 and "Q8Mlp" not in ops and "CachedAttention" not in ops
    assert info["attention_nodes"] == 2 and "GroupQueryAttention" not in ops
    embedded = {t.name: t for t in twin.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    scale_inputs = [n.input[i] for n in twin.graph.node
                    for i in {"MatMulQ8": (2,), "Q8Layer": (3, 10, 13, 15)}.get(n.op_type, ())]
    assert len(scale_inputs) == 1 + 4 * 2
    assert scale_inputs and all(embedded[name].data_type == onnx.TensorProto.FLOAT16 for name in scale_inputs)
    assert "MatMulNBits" not in ops and {o.name for o in twin.graph.output} == {o.name for o in standard.graph.output}
    # The same external data file, not a copy: the folder grows by the graph file only.
    locations = {e.value for t in twin.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert info["bytes"] == (tiny_int8_dir / KERNEL_MODEL).stat().st_size
    scale_bytes = sum(len(embedded[name].raw_data) for name in set(scale_inputs))
    assert info["bytes"] <= (tiny_int8_dir / "model.onnx").stat().st_size + scale_bytes + 1024
    assert sorted(p.name for p in tiny_int8_dir.iterdir() if p.name.startswith("model")) == \
        ["model.kernels.onnx", "model.onnx", "model.onnx.data"]


def test_no_kernel_graph_writes_none_and_the_tool_adds_it(plain_dir, tmp_path):
    m = read_manifest(plain_dir)
    assert "kernel_model" not in m.files and not (plain_dir / KERNEL_MODEL).exists()
    assert "kernel_graph" not in m.quantization
    with pytest.raises(KernelError) as info:
        edgellm.load(plain_dir, kernels=True)
    assert "python -m edgellm.convert.kernel_graph" in str(info.value) and "kernels=None" in str(info.value)
    assert edgellm.load(plain_dir).graph.graph == "model.onnx"
    # python -m edgellm.convert.kernel_graph DIR adds it to the existing folder, checked against model.onnx.
    folder = tmp_path / "model"
    shutil.copytree(plain_dir, folder)
    before = {p.name: p.stat().st_size for p in folder.iterdir()}
    old_fingerprint = fingerprint(folder)
    isa = kernel_library()
    run = subprocess.run([sys.executable, "-m", "edgellm.convert.kernel_graph", str(folder)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert f"wrote {folder / KERNEL_MODEL}" in run.stdout and "argmax match" in run.stdout
    after = {p.name: p.stat().st_size for p in folder.iterdir()}
    assert set(after) - set(before) == {KERNEL_MODEL}
    assert {k: v for k, v in after.items() if k != "edgellm.json"} == {**{k: v for k, v in before.items()
                                                                          if k != "edgellm.json"},
                                                                       KERNEL_MODEL: after[KERNEL_MODEL]}
    m = read_manifest(folder)
    verify_checksums(folder, m)
    assert m.files["kernel_model"] == KERNEL_MODEL and fingerprint(folder) != old_fingerprint
    check = m.validation.kernel_graph
    assert check is not None and check.reference == "int8" and check.isa == isa and check.kept
    assert check.passed == (check.failures == ())
    llm = edgellm.load(folder, kernels=True)
    assert llm.graph.kernels and llm.graph.graph == KERNEL_MODEL
    # Run again, unfused this time: the twin is rebuilt in place, nothing else is left behind.
    run = subprocess.run([sys.executable, "-m", "edgellm.convert.kernel_graph", str(folder), "--no-fuse"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert {p.name for p in folder.iterdir()} == set(after)
    m = read_manifest(folder)
    verify_checksums(folder, m)
    assert m.quantization["kernel_graph"]["fused_layers"] == 0 and m.validation.kernel_graph.passed
    ops = [n.op_type for n in onnx.load(str(folder / KERNEL_MODEL), load_external_data=False).graph.node]
    assert ops.count(OP_TYPE) == 9 and "Q8Mlp" not in ops


def test_the_tool_refuses_a_folder_it_cannot_serve(tiny_fp32_dir, tmp_path):
    run = subprocess.run([sys.executable, "-m", "edgellm.convert.kernel_graph", str(tiny_fp32_dir)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and run.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "fp32" in run.stderr and "int8 CPU" in run.stderr and "Fix:" in run.stderr
    assert not (tiny_fp32_dir / KERNEL_MODEL).exists()


def _logits(llm, ids):
    llm.reset()
    out = llm.session.forward(ids, keep=len(ids)).copy()
    llm.reset()
    return out


def test_kernels_on_and_off_give_the_same_tokens(tiny_int8_dir):
    isa = kernel_library()
    on, off = edgellm.load(tiny_int8_dir, kernels=True), edgellm.load(tiny_int8_dir, kernels=False)
    assert (on.graph.graph, on.graph.kernels, on.graph.isa) == (KERNEL_MODEL, True, isa)
    assert (off.graph.graph, off.graph.kernels) == ("model.onnx", False)
    # auto: the twin runs where the library runs its measured (AVX-512 VNNI) path
    assert edgellm.load(tiny_int8_dir).graph.kernels == (isa == "avx512vnni")
    limits = KernelThresholds()
    params = edgellm.SamplingParams(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    for ids in PROMPTS:
        a, b = _logits(on, ids), _logits(off, ids)
        # (a wrong kernel — transposed weights, lost scales — differs by the logits' own size, ~5 here)
        assert np.abs(a - b).max() <= limits.max_abs_logit_diff, np.abs(a - b).max()
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
        x, y = on.generate(ids, params), off.generate(ids, params)
        if x.token_ids != y.token_ids:  # a near-tie may break either way: then the logits where they part agree
            split = next(i for i, (s, t) in enumerate(zip(x.token_ids, y.token_ids)) if s != t)
            shared = ids + x.token_ids[:split]
            a, b = _logits(on, shared)[-1], _logits(off, shared)[-1]
            assert np.abs(a - b).max() <= limits.max_abs_logit_diff
            assert abs(a.max() - np.sort(a)[-2]) < limits.max_abs_logit_diff  # it was a near-tie
    # The convert gate measured the same and recorded it with its limits.
    check = on.manifest.validation.kernel_graph
    assert check is not None and check.reference == "fp32" and check.thresholds == limits and check.kept
    assert check.isa == isa and check.positions > SETTINGS.window
    assert check.max_abs_logit_diff <= limits.max_abs_logit_diff and check.argmax_match >= limits.min_argmax_match
    assert set(check.decode_ms_per_token) == {"model.onnx", KERNEL_MODEL}


def test_a_strict_limit_fails_the_check_with_its_numbers(tiny_int8_dir):
    from edgellm.convert.kernel_graph import check, twin_session
    from edgellm.runtime import measure
    from edgellm.validation import Thresholds

    kernel_library()
    m = read_manifest(tiny_int8_dir)
    standard, twin = twin_session(tiny_int8_dir, m, 128, threads=1)
    tokens = list(range(10, 90))
    reference = measure.perplexity(standard, tokens, 64)
    result = check(standard, twin, tokens, 64, [], set(), 16, tokens[:8], "int8", reference, Thresholds(),
                   limits=KernelThresholds(max_abs_logit_diff=-1.0, min_argmax_match=1.01))
    assert not result.passed and len(result.failures) >= 2
    assert any("limit -1.0" in f and "kernel graph logits differ" in f for f in result.failures)


def test_kernels_true_without_the_library_is_a_clear_error(tiny_int8_dir, tmp_path):
    # A real install where the library was not built: this edgellm's sources, less the built .so.
    package = tmp_path / "site" / "edgellm"
    shutil.copytree(Path(edgellm.__file__).parent, package,
                    ignore=shutil.ignore_patterns("libedgellm_ortops.so", "__pycache__"))
    code = ("import sys, edgellm\n"
            "assert edgellm.__file__.startswith(sys.argv[2]), edgellm.__file__\n"
            "assert edgellm.load(sys.argv[1]).graph.graph == 'model.onnx'\n"  # auto: the standard graph
            "try:\n    edgellm.load(sys.argv[1], kernels=True)\n"
            "except edgellm.KernelError as exc:\n    print(exc)\n")
    env = {**os.environ, "PYTHONPATH": str(package.parent)}
    env.pop(KERNEL_ENV, None)
    # cwd: not the checkout, whose edgellm has the library
    run = subprocess.run([sys.executable, "-c", code, str(tiny_int8_dir), str(package)], capture_output=True,
                         text=True, env=env, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    message = run.stdout.strip()
    assert message.startswith("kernels=True asks for edgellm's CPU kernels, but they cannot run here")
    assert "python -m edgellm.kernels build" in message and "\n" not in message



def test_auto_runs_the_twin_only_on_the_measured_isa(tiny_int8_dir, tmp_path):
    # EDGELLM_Q8_ISA=avx2 makes the library run (and report) its AVX2 path, as on an AVX2-only CPU.
    kernel_library()
    code = ("import sys, edgellm\n"
            "auto = edgellm.load(sys.argv[1]).graph\n"
            "forced = edgellm.load(sys.argv[1], kernels=True).graph\n"
            "print(auto.graph, auto.isa, forced.graph, forced.isa)\n"
            "print(auto.reason)\n")
    env = {**os.environ, "EDGELLM_Q8_ISA": "avx2"}
    env.pop(KERNEL_ENV, None)
    run = subprocess.run([sys.executable, "-c", code, str(tiny_int8_dir)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    choice, reason = run.stdout.strip().splitlines()
    assert choice == "model.onnx avx2 model.kernels.onnx avx2"
    assert "only the avx512vnni one is measured faster" in reason


def test_edgellm_kernels_0_runs_the_standard_graph(tiny_int8_dir, monkeypatch):
    kernel_library()
    monkeypatch.setenv(KERNEL_ENV, "0")
    llm = edgellm.load(tiny_int8_dir)
    assert llm.graph.graph == "model.onnx" and not llm.graph.kernels and "EDGELLM_KERNELS" in llm.graph.reason
    assert edgellm.load(tiny_int8_dir, kernels=False).graph.graph == "model.onnx"
    with pytest.raises(KernelError, match="EDGELLM_KERNELS='0' turns them off. Fix: unset EDGELLM_KERNELS"):
        edgellm.load(tiny_int8_dir, kernels=True)
    monkeypatch.setenv(KERNEL_ENV, "1")  # required, from the environment
    assert edgellm.load(tiny_int8_dir).graph.kernels
    monkeypatch.setenv(KERNEL_ENV, "sometimes")
    with pytest.raises(InvalidParameterError, match="EDGELLM_KERNELS='sometimes' is not a setting"):
        edgellm.load(tiny_int8_dir)
    monkeypatch.delenv(KERNEL_ENV)
    with pytest.raises(InvalidParameterError, match="kernels='yes' must be True"):
        edgellm.load(tiny_int8_dir, kernels="yes")


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_damaged_twin_is_caught_like_a_damaged_model_onnx(copy):
    kernel_library()
    _truncate(copy / KERNEL_MODEL)
    with pytest.raises(ModelFormatError, match=f"{KERNEL_MODEL} does not match its sha256"):
        edgellm.load(copy)
    with pytest.raises(ModelFormatError, match=f"onnxruntime cannot load {copy / KERNEL_MODEL}"):
        edgellm.load(copy, verify=False)
    assert edgellm.load(copy, verify=False, kernels=False).graph.graph == "model.onnx"  # it is not read then
    (copy / KERNEL_MODEL).unlink()
    with pytest.raises(ModelFormatError, match=f"{KERNEL_MODEL} is missing"):
        edgellm.load(copy)


def test_info_and_bench_say_which_graph_runs(tiny_int8_dir):
    from click.testing import CliRunner

    from edgellm.bench import run_bench
    from edgellm.cli import main

    isa = kernel_library()
    out = CliRunner().invoke(main, ["info", str(tiny_int8_dir)])
    assert out.exit_code == 0, out.output
    assert (f"kernel graph: {KERNEL_MODEL} (9 MatMulNBits as ai.edgellm.MatMulQ8, 2 layer tails as ai.edgellm.Q8Mlp, "
            "2 layers as ai.edgellm.Q8Layer, shares the weights)") in out.output
    assert f"decode graph here: {KERNEL_MODEL} with edgellm kernels ({isa};" in out.output
    data = json.loads(CliRunner().invoke(main, ["info", str(tiny_int8_dir), "--json"]).output)
    assert data["decode_graph"]["graph"] == KERNEL_MODEL and data["decode_graph"]["isa"] == isa
    for kernels, graph in ((True, KERNEL_MODEL), (False, "model.onnx")):
        report = run_bench(str(tiny_int8_dir), runs=1, warmup=0, new_tokens=3, threads=1, progress=False,
                           kernels=kernels)
        assert (report.graph, report.kernels, report.kernel_isa) == (graph, kernels, isa if kernels else None)
        saved = report.to_device_benchmark()
        assert saved.graph == graph and saved.key[-1] == graph
    out = CliRunner().invoke(main, ["bench", "-m", str(tiny_int8_dir), "--runs", "1", "--warmup", "0",
                                    "--new-tokens", "2", "--kernels", "off"])
    assert out.exit_code == 0, out.output
    assert "graph model.onnx: onnxruntime kernels (turned off (kernels=False))" in out.output


def test_the_twin_runs_without_torch(tiny_int8_dir):
    kernel_library()
    code = ("import sys, edgellm; llm = edgellm.load(sys.argv[1], kernels=True); "
            "llm.generate(list(range(10, 30)), edgellm.SamplingParams(max_new_tokens=3)); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    run = subprocess.run([sys.executable, "-c", code, str(tiny_int8_dir)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
