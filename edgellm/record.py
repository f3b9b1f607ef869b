"""Results files for every published figure: what ran, where, on what, and the raw samples.

One writer for `scripts/bench_*.py` and `edgellm bench --save` (stdlib only, torch-free):

    from edgellm.record import Recorder

    rec = Recorder("bench_optimizations", parameters=vars(args))   # notes loadavg and time before
    ...measure, keeping every raw sample...
    rec.write("benchmarks/optimizations.json", samples={"int8": [12.1, 12.3]},
              summary={"int8": {"decode_ms_per_token": 12.2}},
              table=Table(["variant", "ms/token"], [["int8", 12.2]]))

The JSON file holds: the command line, git revision (+ dirty flag) of the checkout that ran, UTC
start/end, the CPU model name and flags from /proc/cpuinfo, nproc, loadavg before/after, the nice
value, thread env vars, package versions (read from metadata, nothing imported), the parameters,
the raw samples, a summary, and optionally the markdown table the README shows. It is written
atomically (temp file + rename), so a killed benchmark never leaves half a file.

    python -m edgellm.record table benchmarks/optimizations.json   # the README table, from the file
    python -m edgellm.record update README.md models/*.md          # rewrite every marked table

In the docs, a table follows its marker line, `<!-- results: benchmarks/FILE.json [NAME] -->`, and
ends at the first line that does not start with "|"; `update` replaces it with the file's table.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
PACKAGES = ("edgellm", "onnxruntime", "numpy", "tokenizers", "llama-cpp-python", "torch", "transformers",
            "optimum-onnx", "optimum", "jinja2")
SIMD_PREFIXES = ("avx", "amx", "fma", "f16c", "asimd", "sve", "neon", "fp16", "i8mm", "bf16")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ORT_NUM_THREADS")


@dataclass(frozen=True)
class Table:
    """A markdown table stored in the results file, so the README copy and the file cannot disagree."""

    columns: list[str]
    rows: list[list[Any]]
    caption: str = ""

    def markdown(self) -> str:
        lines = [f"| {' | '.join(self.columns)} |", f"|{'|'.join(' --- ' for _ in self.columns)}|"]
        lines += [f"| {' | '.join(_cell(v) for v in row)} |" for row in self.rows]
        return "\n".join(([self.caption, ""] if self.caption else []) + lines)


def _cell(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Machine:
    cpu_model: str
    cpu_flags: str  # /proc/cpuinfo's flags line, as is
    simd: list[str]  # the flags that change kernels: avx2, avx512*, amx*, fma, f16c, neon/asimd...
    nproc: int
    affinity: int
    mem_total_mb: int | None
    system: str
    python: str
    nice: int
    thread_env: dict[str, str]


def machine() -> Machine:
    """The CPU model name and flags (from /proc/cpuinfo, the first processor), core counts, OS, nice value."""
    model, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:  # x86 / arm
                flags = value.split()
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    simd = [f for f in flags if f.startswith(SIMD_PREFIXES)]
    return Machine(cpu_model=model, cpu_flags=" ".join(flags), simd=simd, nproc=os.cpu_count() or 1, affinity=affinity,
                   mem_total_mb=mem, system=f"{platform.system()} {platform.release()} {platform.machine()}",
                   python=platform.python_version(), nice=os.nice(0) if hasattr(os, "nice") else 0,
                   thread_env={k: os.environ[k] for k in THREAD_ENV if k in os.environ})


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the packages that shape a figure (absent ones are left out)."""
    found = {}
    for name in PACKAGES + extra:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_revision(where: Path | None = None) -> dict[str, Any]:
    """HEAD of the checkout holding this package (or `where`), and whether tracked files differ from it."""
    root = where or Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}
    return {"revision": head, "dirty": bool(dirty)}


def kernels() -> dict[str, Any]:
    """Whether edgellm's own int8 CPU kernels could run here (load() then runs a folder's model.kernels.onnx unless
    told not to): the library file, the ISA it dispatches to, the prefetch distance it uses (its default depends on the
    CPU) and EDGELLM_KERNELS as set."""
    try:
        from . import kernels as library
    except ImportError:
        return {"library": None, "isa": None, "prefetch_bytes": None,
                "EDGELLM_KERNELS": os.environ.get("EDGELLM_KERNELS")}
    path = library.library_path()
    return {"library": path.name if path is not None else None, "isa": library.isa() if path is not None else None,
            "prefetch_bytes": library.prefetch_distance() if path is not None else None,
            "EDGELLM_KERNELS": os.environ.get("EDGELLM_KERNELS")}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


@dataclass
class Recorder:
    """Create before measuring (notes start time and loadavg), `write()` after."""

    name: str
    parameters: dict[str, Any] = field(default_factory=dict)
    command: str = field(default_factory=lambda: shlex.join([Path(sys.executable).name] + sys.argv))
    started_utc: str = field(default_factory=_now)
    loadavg_before: list[float] | None = field(default_factory=_loadavg)

    def document(self, samples: Any, summary: Any = None, table: Table | None = None,
                 notes: str = "", extra_versions: tuple[str, ...] = (),
                 tables: dict[str, Table] | None = None) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION, "name": self.name, "command": self.command,
            "git": git_revision(), "started_utc": self.started_utc, "finished_utc": _now(),
            "machine": asdict(machine()), "kernels": kernels(),
            "loadavg_before": self.loadavg_before, "loadavg_after": _loadavg(),
            "versions": versions(extra_versions), "parameters": _jsonable(self.parameters),
            "summary": _jsonable(summary), "table": asdict(table) if table else None,
            "tables": {k: asdict(t) for k, t in (tables or {}).items()}, "notes": notes,
            "samples": _jsonable(samples),
        }

    def write(self, path: str | os.PathLike, samples: Any, summary: Any = None, table: Table | None = None,
              notes: str = "", extra_versions: tuple[str, ...] = (), tables: dict[str, Table] | None = None) -> Path:
        """Write the results file atomically; returns its path. `tables`: more named tables besides `table`."""
        doc = self.document(samples, summary, table, notes, extra_versions, tables)
        return write_json_atomic(Path(path), doc)


def write_json_atomic(path: Path, doc: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, ensure_ascii=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _jsonable(value: Any) -> Any:
    """Dataclasses, paths, numpy scalars and arrays to plain JSON values."""
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    return value


def read_table(path: str | os.PathLike, name: str | None = None) -> Table:
    """The file's table, or its table called `name`."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    stored = doc.get("tables", {}).get(name) if name else doc.get("table")
    if not stored:
        names = ", ".join(doc.get("tables") or {}) or "none"
        raise SystemExit(f"error: {path} stores no table {name or ''} (named tables: {names}). "
                         "Fix: name one of those with --name.")
    return Table(**stored)


MARKER = re.compile(r"^<!-- results: (\S+\.json)(?: (\S+))? -->$")


def render_doc(text: str, root: Path, missing_ok: bool = False) -> str:
    """`text` with the table after every results marker replaced by the cited file's table
    (missing_ok: a marker whose file does not exist keeps its table)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        out.append(lines[i])
        match = MARKER.match(lines[i].strip())
        i += 1
        if match:
            start = i
            while i < len(lines) and lines[i].startswith("|"):
                i += 1
            if missing_ok and not (root / match.group(1)).is_file():
                out.extend(lines[start:i])
                continue
            out.extend(read_table(root / match.group(1), match.group(2)).markdown().split("\n"))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m edgellm.record", description="Print what a results file holds.")
    parser.add_argument("what", choices=["table", "machine", "update"])
    parser.add_argument("files", nargs="*")
    parser.add_argument("--name", help="a named table of the file (default: its main table)")
    args = parser.parse_args(argv)
    if args.what == "machine":
        print(json.dumps({"machine": asdict(machine()), "loadavg": _loadavg(), "versions": versions(),
                          "git": git_revision()}, indent=1))
        return
    if args.what == "update":
        for file in args.files:
            path = Path(file)
            text = path.read_text(encoding="utf-8")
            new = render_doc(text, Path.cwd(), missing_ok=True)
            if new != text:
                path.write_text(new, encoding="utf-8")
                print(f"updated {file}")
        return
    for file in args.files:
        doc = json.loads(Path(file).read_text(encoding="utf-8"))
        m = doc["machine"]
        print(read_table(file, args.name).markdown())
        print(f"\n`{doc['command']}` → `{file}` ({m['cpu_model']}, {m['affinity']} cores, load "
              f"{doc['loadavg_before'][0] if doc['loadavg_before'] else '?'}, {doc['started_utc'][:10]})\n")


if __name__ == "__main__":
    main()
