"""The converter revision that invalidates cached conversions is derived from the converter's sources."""

import shutil
from pathlib import Path

from edgellm.convert.pipeline import CONVERTER_REVISION, _source_revision


def test_revision_follows_the_converter_sources_and_nothing_else(tmp_path):
    import edgellm

    package = tmp_path / "edgellm"
    shutil.copytree(Path(edgellm.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    assert _source_revision(package) == CONVERTER_REVISION
    with open(package / "runtime" / "llm.py", "a") as handle:  # runtime code does not change what convert writes
        handle.write("\n# touched\n")
    assert _source_revision(package) == CONVERTER_REVISION
    for changed in ("convert/quantize.py", "contract.py", "manifest.py", "data/calibration_en.txt"):
        before = _source_revision(package)
        with open(package / changed, "a") as handle:
            handle.write("\n# touched\n")
        assert _source_revision(package) != before, changed
