"""Check edgellm/kernels/ort_abi.h against an onnxruntime C API header (a dev tool; never run by CI).

ort_abi.h declares onnxruntime's OrtApi slots by number and the OrtCustomOp fields by position. No package we
install ships onnxruntime_c_api.h, so whoever adds a function (or moves to a newer onnxruntime) fetches the
header of that release from onnxruntime's repository (include/onnxruntime/core/session/onnxruntime_c_api.h)
and runs:

    python scripts/check_ort_abi.py path/to/onnxruntime_c_api.h

It prints each declared function with its slot in that header and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ABI = Path(__file__).resolve().parent.parent / "edgellm" / "kernels" / "ort_abi.h"


def struct_members(source: str, name: str) -> list[str]:
    """Member names of `struct name { ... };` in declaration order (function pointers and macro-declared ones)."""
    start = source.index("{", source.index(f"struct {name} {{"))
    depth, end = 0, start
    for end in range(start, len(source)):
        depth += {"{": 1, "}": -1}.get(source[end], 0)
        if depth == 0:
            break
    body = re.sub(r"/\*.*?\*/", "", source[start + 1:end], flags=re.S)
    body = re.sub(r"//[^\n]*", "", body)
    body = "\n".join(line for line in body.splitlines() if not line.strip().startswith("#"))
    members, current, parens = [], "", 0
    for ch in body:
        parens += {"(": 1, ")": -1}.get(ch, 0)
        if ch == ";" and parens == 0:
            members.append(" ".join(current.split()))
            current = ""
        else:
            current += ch
    names = []
    for decl in filter(None, members):
        match = (re.match(r"ORT_API2_STATUS\(\s*(\w+)", decl) or re.match(r"ORT_API_T\([^,]+,\s*(\w+)", decl)
                 or re.search(r"\(\s*(?:\w+\s*)?\*\s*(\w+)\s*\)", decl))
        release = re.match(r"ORT_CLASS_RELEASE\(\s*(\w+)\)", decl)
        if release:
            names.append("Release" + release.group(1))
        elif match:
            names.append(match.group(1))
        else:
            names.append(decl.split()[-1])  # a plain field such as `uint32_t version`
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("header", type=Path, help="onnxruntime_c_api.h of the onnxruntime release to check against")
    args = parser.parse_args(argv)
    header = args.header.read_text(encoding="utf-8", errors="replace")
    ours = ABI.read_text(encoding="utf-8")
    version = re.search(r"#define ORT_API_VERSION (\d+)", header)
    print(f"header: ORT_API_VERSION {version.group(1) if version else '?'}")
    api = struct_members(header, "OrtApi")
    bad = 0
    for name, slot in re.findall(r"using (\w+) = OrtFn<(\d+),", ours):
        found = api.index(name) if name in api else None
        ok = found == int(slot)
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} OrtApi[{slot}] {name}" + ("" if ok else f" (header: {found})"))
    theirs, mine = struct_members(header, "OrtCustomOp"), struct_members(ours, "OrtCustomOp")
    ok = theirs[:len(mine)] == mine
    bad += not ok
    print(f"{'ok ' if ok else 'BAD'} OrtCustomOp fields ({len(mine)} declared, {len(theirs)} in the header)")
    if not ok:
        print(f"    ours:   {mine}\n    header: {theirs}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
