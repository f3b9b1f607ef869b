"""Export the tiny random test models (tests/conftest.py) to folders, for a run where torch is absent.

    python scripts/arm64/export_tiny_models.py OUT

writes OUT/fp32, OUT/int8, OUT/int8-bi and OUT/draft-fp32 (plus the Hugging Face sources under OUT/hf).
Run the runtime tests against them with EDGELLM_TEST_TINY_MODELS=OUT. Needs the [convert] extra (x86).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out = Path(sys.argv[1]).resolve()
    os.environ.pop("EDGELLM_TEST_TINY_MODELS", None)  # read by conftest at import: we are the ones converting
    sys.path.insert(0, str(REPO))
    from tests.conftest import export_tiny_models

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        folders = export_tiny_models(staging)
        shutil.rmtree(out, ignore_errors=True)
        staging.rename(out)  # the complete set appears at once
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in folders:
        print(f"exported {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
