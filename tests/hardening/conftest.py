"""Helpers for the hostile-input suite: a private, writable copy of the tiny int8 model per test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgellm.manifest import MANIFEST_NAME, sha256_file


class ModelCopy:
    """A copy of a converted folder that a test may damage; `manifest` edits go through rewrite()."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST_NAME).read_text())

    def rewrite(self, data: dict) -> None:
        (self.path / MANIFEST_NAME).write_text(json.dumps(data))

    def edit(self, change) -> None:
        data = self.manifest
        change(data)
        self.rewrite(data)

    def recompute_checksums(self) -> None:
        """What a tamperer does after changing a file: the checksums match again."""
        data = self.manifest
        data["checksums"] = {name: sha256_file(self.path / name) for name in data["checksums"]}
        self.rewrite(data)


@pytest.fixture
def model_copy(tiny_int8_dir, tmp_path) -> ModelCopy:
    target = tmp_path / "model"
    shutil.copytree(tiny_int8_dir, target)
    return ModelCopy(target)
