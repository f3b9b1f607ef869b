"""The results-file writer: every field a published figure needs, written atomically, table round-trips."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

from edgellm.record import Recorder, Table, main, read_table


def test_results_file_holds_provenance_and_raw_samples(tmp_path: Path) -> None:
    rec = Recorder("unit", parameters={"threads": 2, "model": tmp_path})
    path = rec.write(tmp_path / "sub" / "r.json", samples={"a": np.array([1.5, 2.5])},
                     summary={"a": np.float32(2.0)}, table=Table(["variant", "ms"], [["a", 2.0]]))
    doc = json.loads(path.read_text())
    assert doc["name"] == "unit"
    assert shlex.split(doc["command"])[1:] == sys.argv  # the exact command line that ran
    assert doc["samples"] == {"a": [1.5, 2.5]} and doc["summary"] == {"a": 2.0}
    assert doc["parameters"] == {"threads": 2, "model": str(tmp_path)}
    assert len(doc["git"]["revision"]) == 40 and isinstance(doc["git"]["dirty"], bool)
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert doc["machine"]["cpu_model"] in cpuinfo and doc["machine"]["cpu_flags"].split()[0] in cpuinfo
    assert doc["machine"]["nproc"] == os.cpu_count()
    assert len(doc["loadavg_before"]) == 3 and len(doc["loadavg_after"]) == 3
    assert doc["versions"]["onnxruntime"] and doc["versions"]["numpy"] == np.__version__
    assert doc["started_utc"].endswith("+00:00")
    from edgellm import kernels  # whether a folder's model.kernels.onnx could run: every figure says

    built = kernels.library_path()
    assert doc["kernels"]["library"] == (built.name if built else None)
    assert doc["kernels"]["isa"] == (kernels.isa() if built else None)
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temp file left behind


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        Recorder("unit").write(path, samples={"bad": object()})
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_table_printed_from_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = Recorder("unit").write(tmp_path / "r.json", samples=[], table=Table(["a", "b"], [["x", 1.234], ["y", 3]]))
    assert read_table(path).markdown() == "| a | b |\n| --- | --- |\n| x | 1.23 |\n| y | 3 |"
    main(["table", str(path)])
    assert "| x | 1.23 |" in capsys.readouterr().out
    named = Recorder("unit").write(tmp_path / "n.json", samples=[], tables={"sweep": Table(["k"], [[1]])})
    assert read_table(named, "sweep").rows == [[1]]
    with pytest.raises(SystemExit, match="named tables: sweep"):
        read_table(named)


def test_update_rewrites_the_table_after_each_marker(tmp_path: Path) -> None:
    from edgellm.record import render_doc

    Recorder("unit").write(tmp_path / "benchmarks" / "r.json", samples=[], table=Table(["a"], [[2]]),
                           tables={"other": Table(["b"], [[3]])})
    doc = ("intro\n<!-- results: benchmarks/r.json -->\n| a |\n| --- |\n| 1 |\n\ntext\n"
           "<!-- results: benchmarks/r.json other -->\n| old |\nend")
    assert render_doc(doc, tmp_path) == ("intro\n<!-- results: benchmarks/r.json -->\n| a |\n| --- |\n| 2 |\n\ntext\n"
                                         "<!-- results: benchmarks/r.json other -->\n| b |\n| --- |\n| 3 |\nend")
