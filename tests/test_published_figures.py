"""Every results file README.md and models/*.md cite exists, is complete, and its tables appear verbatim.

A table in the docs is pasted from `python -m edgellm.record table benchmarks/FILE.json [--name NAME]`;
if a file is re-generated and the docs are not updated (or the other way round), this fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgellm.record import Table

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "models").glob("*.md"))]
CITED = sorted({m for doc in DOCS for m in re.findall(r"benchmarks/[\w.-]+\.json", doc.read_text())})
FIELDS = ("command", "git", "machine", "versions", "loadavg_before", "loadavg_after", "parameters", "samples",
          "started_utc")


def test_docs_cite_results_files() -> None:
    assert CITED, "README/models name no benchmarks/*.json results file"


@pytest.mark.parametrize("cited", CITED)
def test_cited_results_file_is_complete_and_its_tables_are_in_the_docs(cited: str) -> None:
    path = REPO / cited
    assert path.is_file(), f"{cited} is cited but not committed"
    doc = json.loads(path.read_text())
    for key in FIELDS:
        assert doc.get(key) not in (None, "", {}), f"{cited} lacks {key}"
    assert doc["machine"]["cpu_model"] and doc["machine"]["cpu_flags"], f"{cited}: no CPU model/flags"
    assert doc["git"]["revision"], f"{cited}: no git revision"
    text = "\n".join(d.read_text() for d in DOCS if cited in d.read_text())
    tables = ([doc["table"]] if doc.get("table") else []) + list((doc.get("tables") or {}).values())
    for stored in tables:
        markdown = Table(**stored).markdown()
        assert markdown in text, f"the docs citing {cited} do not show its table as stored:\n{markdown}"
