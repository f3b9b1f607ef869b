"""Every results file README.md and models/*.md cite exists and is complete, and every table marked
`<!-- results: benchmarks/FILE.json [NAME] -->` is exactly the table stored in that file.

Regenerate a file with the command it stores, then `python -m edgellm.record update README.md models/*.md`;
if one changes without the other, this fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgellm.record import MARKER, render_doc

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "models").glob("*.md"))]
MARKED = sorted({m.group(1) for doc in DOCS for line in doc.read_text().splitlines()
                 if (m := MARKER.match(line.strip()))})
FIELDS = ("command", "git", "machine", "versions", "loadavg_before", "loadavg_after", "parameters", "samples",
          "started_utc")


def test_docs_mark_their_tables() -> None:
    assert MARKED, "README/models mark no table with its results file"


@pytest.mark.parametrize("cited", MARKED)
def test_cited_results_file_is_committed_and_complete(cited: str) -> None:
    path = REPO / cited
    assert path.is_file(), f"{cited} is cited but not committed"
    doc = json.loads(path.read_text())
    for key in FIELDS:
        assert doc.get(key) not in (None, "", {}), f"{cited} lacks {key}"
    assert doc["machine"]["cpu_model"] and doc["machine"]["cpu_flags"], f"{cited}: no CPU model/flags"
    assert doc["git"]["revision"], f"{cited}: no git revision"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_marked_tables_equal_their_results_files(doc: Path) -> None:
    text = doc.read_text()
    assert render_doc(text, REPO) == text, (f"{doc.name}: a marked table differs from its results file. Fix: "
                                            f"python -m edgellm.record update {doc.relative_to(REPO)}")
