"""The validation report is typed end to end, and the gate judges every precision with recorded thresholds."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
from click.testing import CliRunner

import edgellm
from edgellm.cli import main
from edgellm.convert.validate import ValidationSettings, judge
from edgellm.errors import ModelFormatError, ValidationError
from edgellm.manifest import MANIFEST_NAME, read_manifest
from edgellm.runtime.measure import KVConsistency
from edgellm.validation import Thresholds, ValidationReport, gate_failures


def test_report_round_trips_through_the_manifest_json(tiny_int8_dir):
    report = read_manifest(tiny_int8_dir).validation
    assert isinstance(report, ValidationReport) and isinstance(report.kv_consistency["int8"], KVConsistency)
    data = json.loads((tiny_int8_dir / MANIFEST_NAME).read_text())["validation"]
    assert ValidationReport.from_dict(data) == report and report.to_dict() == data
    assert data["gate"]["thresholds"] == Thresholds().to_dict()  # the limits used are in the folder
    assert data["gate"]["settings"] == {"heldout_tokens": 256, "window": 128, "consistency_tokens": 24}


def test_fp32_is_gated_against_the_source_and_its_kv_cache(tiny_fp32_dir):
    report = read_manifest(tiny_fp32_dir).validation
    assert report.precision == "fp32" and report.perplexity_ratio is None and set(report.kv_consistency) == {"fp32"}
    assert report.gate.passed and report.gate.failures == ()  # checked, not assumed: the numbers are below
    assert report.source_max_abs_diff <= report.gate.thresholds.max_source_diff
    assert report.kv_consistency["fp32"].worst <= report.gate.thresholds.kv_tolerance_fp32
    broken = replace(report, source_max_abs_diff=0.5)  # an export bug: ONNX and PyTorch disagree
    failures = gate_failures(broken, Thresholds())
    assert len(failures) == 1 and "PyTorch source by 0.5" in failures[0] and "limit 0.01" in failures[0]
    with pytest.raises(ValidationError, match=r"the fp32 model failed validation: .*Fix: .*--no-gate") as caught:
        judge(broken, ValidationSettings(), enforced=True)
    assert caught.value.report["gate"]["passed"] is False
    written = judge(broken, ValidationSettings(), enforced=False)  # --no-gate: written, and says it failed
    assert written.gate.passed is False and written.gate.enforced is False


def test_int8_gate_limits_are_the_recorded_ones(tiny_int8_dir):
    report = read_manifest(tiny_int8_dir).validation
    strict = Thresholds(max_ppl_ratio=0.5, min_agreement=1.01)
    failures = gate_failures(report, strict)
    assert any("the limit is 0.5x" in f for f in failures) and any("the limit is 1.01" in f for f in failures)
    assert any("not compared with fp32" in f for f in gate_failures(replace(report, perplexity_ratio=None), strict))


def test_a_bad_report_field_is_named(tiny_int8_dir):
    data = json.loads((tiny_int8_dir / MANIFEST_NAME).read_text())["validation"]
    data["kv_consistency"]["int8"]["bit_identical"] = "yes"
    with pytest.raises(ModelFormatError, match=r"validation\.kv_consistency\.int8\.bit_identical='yes'"):
        ValidationReport.from_dict(data)


def test_a_model_with_an_unreadable_report_still_loads_and_info_says_so(tiny_int8_dir, tmp_path, caplog):
    folder = tmp_path / "model"
    shutil.copytree(tiny_int8_dir, folder)
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["validation"] = {"perplexity_ratio": 1.0}  # an older converter's layout
    (folder / MANIFEST_NAME).write_text(json.dumps(data))
    with caplog.at_level("WARNING", logger="edgellm.manifest"):
        assert edgellm.load(folder, threads=1).manifest.validation is None
    assert any("ignoring the manifest's validation report" in r.message for r in caplog.records)
    result = CliRunner().invoke(main, ["info", str(folder)])
    assert result.exit_code == 0 and "validation: none recorded" in result.output


def test_info_prints_the_verdict_with_its_thresholds(tiny_int8_dir, tiny_fp32_dir):
    for folder, parts in ((tiny_int8_dir, ["perplexity x", "(limit 1.03)", "(limit 0.9)"]),
                          (tiny_fp32_dir, ["gate passed", "source vs ONNX logits", "(limit 0.01)", "(limit 0.002)"])):
        result = CliRunner().invoke(main, ["info", str(folder)])
        assert result.exit_code == 0, result.output
        line = next(line for line in result.output.splitlines() if line.startswith("gate "))
        assert all(p in line for p in parts), line
