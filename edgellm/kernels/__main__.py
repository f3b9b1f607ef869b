"""python -m edgellm.kernels build [--out PATH] | info

build: compile the kernel library for this machine (see edgellm.kernels.build). One line `error: ...` and exit 1
when it cannot (no compiler, not x86-64 Linux): edgellm then runs onnxruntime's kernels, so scripts/setup.sh
goes on. info: where the library is and which instruction set its kernels run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import BuildError, build, default_library, isa, library_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgellm.kernels", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="compile libedgellm_ortops.so for this machine")
    b.add_argument("--out", type=Path, default=None, help=f"library file to write (default {default_library()})")
    b.add_argument("-v", "--verbose", action="store_true", help="print the compiler commands")
    sub.add_parser("info", help="where the library is and which instruction set it runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(message)s")
    if args.command == "build":
        start = time.perf_counter()
        try:
            out = build(args.out)
        except BuildError as exc:
            print(f"error: edgellm kernels not built: {exc}", file=sys.stderr)
            return 1
        print(f"edgellm kernels: built {out} in {time.perf_counter() - start:.1f} s")
        return 0
    path = library_path()
    print(f"library: {path if path else 'unavailable'}\nisa: {isa()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
