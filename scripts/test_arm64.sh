#!/usr/bin/env bash
# The torch-free runtime on aarch64, under user-mode emulation (qemu), on an x86-64 Debian/Ubuntu machine,
# as root (CI is). Run from a checkout after scripts/setup.sh (the x86 side needs .venv with [convert]):
#
#   sudo bash scripts/test_arm64.sh
#
# 1. apt: qemu-user-static, debootstrap; the qemu-aarch64 binfmt handler (registered with the F flag).
# 2. A Debian bookworm arm64 root, built once with debootstrap into .cache/arm64-root (about 6 minutes) and
#    reused while its marker matches; a venv there with edgellm's core (onnxruntime's aarch64 wheel, tokenizers,
#    numpy, ...: no torch) at the x86 venv's versions, and this checkout's edgellm as a wheel.
# 3. In the root: the runtime unit tests (tests/runtime, on tiny models exported on x86 first), and the real
#    default int8 model on 8 fixed prompts, greedy: arm64's token ids must equal x86's, or first differ only at a
#    step where x86's top-2 logit margin is below 0.25 (a near-tie; ARM's int8 kernels round differently).
#    The table and .cache/arm64/results.json say which, with the margin; the last line counts checks like pytest.
#
# Only /proc is mounted in the root (the host's /sys makes onnxruntime's cpuinfo segfault at import under
# emulation); the pip indexes the host's pip configuration names and the model folder are bind-mounted read-only
# while needed. Every mount is undone on exit, failure included. It fails (never skips) when it cannot run.
# Settings: EDGELLM_PYTHON (x86 python, default .venv/bin/python), EDGELLM_TEST_MODEL (the int8 folder),
# ARM64_MIRROR (Debian mirror, default: apt's), ARM64_NEW_TOKENS (12), ARM64_THREADS (onnxruntime threads, 2),
# ARM64_CPU (the CPU qemu emulates, e.g. cortex-a76 as on a Raspberry Pi 5; default qemu's "max", every feature).
set -euo pipefail
{  # bash reads this whole group before running it: editing the file meanwhile cannot derail a run
cd "$(dirname "$0")/.."
REPO=$PWD
CACHE=$REPO/.cache
WORK=$CACHE/arm64
ROOT=$CACHE/arm64-root
SUITE=bookworm
INCLUDE=python3,python3-venv,python3-pip
ROOT_STAMP="debian $SUITE arm64 minbase $INCLUDE v1"
ROOT_MARKER=.edgellm-arm64-root
HOST_PY=${EDGELLM_PYTHON:-$REPO/.venv/bin/python}
MODEL=${EDGELLM_TEST_MODEL:-$CACHE/models/smollm2-135m-instruct}
NEW_TOKENS=${ARM64_NEW_TOKENS:-12}
THREADS=${ARM64_THREADS:-2}
QEMU=/usr/bin/qemu-aarch64-static
BINFMT=/proc/sys/fs/binfmt_misc
VENV=/opt/venv
STARTED=$(date +%s)
export ARM64_STARTED_UTC
ARM64_STARTED_UTC=$(date -u +%Y-%m-%dT%H:%M:%S+00:00)
WALLS=()

log() { echo "test_arm64: $*"; }
die() {
  echo "test_arm64: error: $*" >&2
  [ "${CI:-}" = true ] && echo "test_arm64: CI=true: the arm64 check failed to run; this is a failure, not a skip" >&2
  echo "1 failed in $(( $(date +%s) - STARTED )).00s"
  exit 1
}
phase_done() {  # phase_done NAME START: record the phase's wall time
  local seconds=$(( $(date +%s) - $2 ))
  WALLS+=(--wall "$1=$seconds")
  log "$1: ${seconds} s"
}

# Every mount at or below a folder, deepest first (mountinfo field 5 is the mount point).
mounts_under() { awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo | sort -r; }
unmount_under() {
  local point
  for point in $(mounts_under "$1"); do
    umount "$point" 2>/dev/null || umount -l "$point"
  done
  [ -z "$(mounts_under "$1")" ] || { echo "test_arm64: error: could not unmount everything under $1" >&2; return 1; }
}
cleanup() { unmount_under "$ROOT.partial" || true; unmount_under "$ROOT" || true; }
remove_root() {  # never follows a mount: everything under it is unmounted first, and rm stays on this file system
  unmount_under "$1"
  rm -rf --one-file-system "$1"
}

# ---- what this machine must be ---------------------------------------------------------------------------------
case "$REPO" in *[[:space:]]*) die "the checkout path '$REPO' contains a space; mount points cannot. Fix: move it." ;; esac
[ "$(uname -m)" = x86_64 ] || die "this emulates aarch64 on x86-64; this machine is $(uname -m). On a real aarch64 board, see README 'ARM'."
[ "$(id -u)" = 0 ] || die "must run as root (apt-get, debootstrap, chroot, mount, binfmt_misc). Fix: sudo bash scripts/test_arm64.sh"
command -v apt-get >/dev/null || die "needs a Debian/Ubuntu host (apt-get not found)."
[ -x "$HOST_PY" ] || die "the x86 python $HOST_PY does not exist. Fix: bash scripts/setup.sh, or set EDGELLM_PYTHON."
mkdir -p "$WORK"
exec 9>"$CACHE/arm64.lock"
flock -n 9 || die "another scripts/test_arm64.sh holds $CACHE/arm64.lock. Fix: wait for it to finish."
trap cleanup EXIT
on_signal() {  # stop what runs in the root (it is ours), then the EXIT trap unmounts
  if [ -n "${CHILD:-}" ]; then kill -TERM "$CHILD" 2>/dev/null || true; wait "$CHILD" 2>/dev/null || true; fi
  exit 130
}
trap on_signal INT TERM
cleanup  # mounts a killed earlier run may have left

# ---- 1. emulator --------------------------------------------------------------------------------------------------
t=$(date +%s)
need=""
[ -x "$QEMU" ] || need="$need qemu-user-static"
command -v debootstrap >/dev/null || need="$need debootstrap"
[ -f /usr/share/keyrings/debian-archive-keyring.gpg ] || need="$need debian-archive-keyring"
if [ -n "$need" ]; then
  log "apt-get install$need"
  apt-get update -qq || die "apt-get update failed (see above). Fix: check /etc/apt/sources.list*."
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $need >/dev/null \
    || die "apt-get install$need failed (see above)."
fi
[ -x "$QEMU" ] || die "$QEMU is missing after installing qemu-user-static."

if ! mountpoint -q "$BINFMT"; then
  mount -t binfmt_misc binfmt_misc "$BINFMT" || die "cannot mount binfmt_misc on $BINFMT (a container without it?). Fix: run on a VM or with --privileged."
fi
ENTRY=$BINFMT/qemu-aarch64
if [ -f "$ENTRY" ]; then
  log "binfmt: qemu-aarch64 already registered ($(sed -n 's/^interpreter //p' "$ENTRY"), flags $(sed -n 's/^flags: //p' "$ENTRY"))"
  grep -qx enabled "$ENTRY" || echo 1 > "$ENTRY"
else
  # The entry qemu's scripts/qemu-binfmt-conf.sh writes for aarch64; F: the kernel opens the interpreter now,
  # so it need not exist inside the root.
  echo ":qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:$QEMU:F" \
    > "$BINFMT/register" || die "cannot register the qemu-aarch64 binfmt handler in $BINFMT/register."
  log "binfmt: registered qemu-aarch64 -> $QEMU (flags F)"
fi
grep -qx enabled "$BINFMT/status" || echo 1 > "$BINFMT/status"
INTERPRETER=$(sed -n 's/^interpreter //p' "$ENTRY")
FLAGS=$(sed -n 's/^flags: //p' "$ENTRY")
# Without F the kernel looks the interpreter up inside the root: put it there.
place_interpreter() { case "$FLAGS" in *F*) ;; *) install -D -m 0755 "$(readlink -f "$INTERPRETER")" "$1$INTERPRETER" ;; esac; }
export ARM64_EMULATOR
ARM64_EMULATOR=$("$QEMU" --version | head -n1)
phase_done emulator "$t"

# ---- 2. the arm64 root --------------------------------------------------------------------------------------------
apt_mirror() {  # the first source apt uses for the suite $SUITE: deb822 .sources, then one-line .list files
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v suite="$SUITE" 'BEGIN { RS = ""; FS = "\n" }
      { uri = ""; suites = ""; types = ""
        for (i = 1; i <= NF; i++) {
          if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, a, " "); uri = a[1] }
          if ($i ~ /^Suites:/) { sub(/^Suites:[ \t]*/, "", $i); suites = " " $i " " }
          if ($i ~ /^Types:/) types = $i
        }
        if (uri != "" && types ~ /deb( |$)/ && index(suites, " " suite " ")) { print uri; exit } }' "$f"
  done
  cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v suite="$SUITE" '
    $1 == "deb" { i = 2; if ($2 ~ /^\[/) { while (i < NF && $i !~ /\]$/) i++; i++ }
                  if ($(i + 1) == suite) { print $i; exit } }'
}
t=$(date +%s)
if [ "$(cat "$ROOT/$ROOT_MARKER" 2>/dev/null)" != "$ROOT_STAMP" ]; then
  MIRROR=${ARM64_MIRROR:-$(apt_mirror | head -n1 || true)}
  MIRROR=${MIRROR:-http://deb.debian.org/debian}
  log "building the $SUITE arm64 root from $MIRROR (once; cached in $ROOT)"
  PARTIAL=$ROOT.partial
  remove_root "$PARTIAL"
  debootstrap --arch=arm64 --foreign --variant=minbase --include="$INCLUDE" "$SUITE" "$PARTIAL" "$MIRROR" \
    > "$WORK/debootstrap-first.log" 2>&1 \
    || { tail -n 20 "$WORK/debootstrap-first.log"; die "debootstrap (first stage) failed; log: $WORK/debootstrap-first.log"; }
  phase_done debootstrap_first_stage "$t"
  t=$(date +%s)
  place_interpreter "$PARTIAL"
  chroot "$PARTIAL" /bin/true 2>/dev/null \
    || die "cannot run an aarch64 binary in the root: the binfmt handler ($ENTRY) does not work here."
  chroot "$PARTIAL" /debootstrap/debootstrap --second-stage > "$WORK/debootstrap-second.log" 2>&1 \
    || { unmount_under "$PARTIAL" || true; tail -n 20 "$PARTIAL/debootstrap/debootstrap.log" 2>/dev/null;
         die "debootstrap --second-stage failed; logs: $WORK/debootstrap-second.log, $PARTIAL/debootstrap/debootstrap.log"; }
  unmount_under "$PARTIAL"  # second-stage mounts /proc and /sys itself
  echo "$ROOT_STAMP" > "$PARTIAL/$ROOT_MARKER"
  remove_root "$ROOT"
  mv "$PARTIAL" "$ROOT"
  phase_done debootstrap_second_stage "$t"
else
  log "reusing the arm64 root in $ROOT"
fi
place_interpreter "$ROOT"

ROOT_ENV=(HOME=/root LANG=C.UTF-8 PATH=$VENV/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin PYTHONDONTWRITEBYTECODE=1)
[ -n "${ARM64_CPU:-}" ] && ROOT_ENV+=("QEMU_CPU=$ARM64_CPU")  # e.g. cortex-a76 (Raspberry Pi 5); default: qemu's max
[ -n "${ARM64_CPU:-}" ] && ROOT_ENV+=("QEMU_CPU=$ARM64_CPU")  # read by qemu at each exec in the root
while IFS= read -r line; do ROOT_ENV+=("$line"); done < <(env | grep -E '^(PIP_[A-Z_]*|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)=' || true)
CHILD=""
in_root() {  # run a command in the root; in the background, so that INT/TERM reach the trap at once
  local rc=0
  chroot "$ROOT" /usr/bin/env -i "${ROOT_ENV[@]}" "$@" &
  CHILD=$!
  wait "$CHILD" || rc=$?
  CHILD=""
  return "$rc"
}
bind_ro() {  # bind_ro HOST_PATH ROOT_PATH
  mkdir -p "$ROOT$2"
  mount --bind "$1" "$ROOT$2" && mount -o remount,bind,ro "$ROOT$2"
}
mount -t proc proc "$ROOT/proc" || die "cannot mount /proc in $ROOT."

# The host's pip configuration, CA bundle, and the local indexes it names, so pip in the root installs alike.
PIP_BINDS=()
pip_config_into_root() {
  local f value path
  for f in $("$HOST_PY" -m pip config list -v 2>/dev/null \
             | sed -n "s/^For variant '\(global\|user\)', will try loading '\(.*\)'$/\2/p") ${PIP_CONFIG_FILE:-}; do
    [ -f "$f" ] && install -D -m 0644 "$f" "$ROOT$f"
  done
  for value in $( { "$HOST_PY" -m pip config list 2>/dev/null | sed -n "s/^[^=]*='\(.*\)'$/\1/p";
                    env | sed -n 's/^PIP_[A-Z_]*=//p'; } | tr ' ' '\n' | sort -u); do
    case "$value" in file://*) path=${value#file://} ;; /*) path=$value ;; *) continue ;; esac
    if [ -d "$path" ]; then
      [ "$(basename "$path")" = simple ] && path=$(dirname "$path")  # index pages link to ../../files
      PIP_BINDS+=("$path")
    elif [ -f "$path" ]; then
      install -D -m 0644 "$path" "$ROOT$path"
    fi
  done
  for f in /etc/ssl/certs/ca-certificates.crt ${PIP_CERT:-} ${SSL_CERT_FILE:-} ${REQUESTS_CA_BUNDLE:-}; do
    [ -f "$f" ] && install -D -m 0644 "$f" "$ROOT$f"
  done
}

# ---- 3. the venv: core deps at the x86 venv's versions, and this checkout's edgellm -------------------------------
# The core and the [constrained] extra (llguidance); test-only: pytest, jsonschema, and onnx (test_gpu_target.py
# reads graphs with it). Never torch.
t=$(date +%s)
mkdir -p "$ROOT/work"
"$HOST_PY" - > "$WORK/pins.txt" <<'EOF'
from importlib import metadata
for name in ("onnxruntime", "numpy", "tokenizers", "llguidance", "pytest", "onnx", "jsonschema"):
    print(f"{name}=={metadata.version(name)}")
EOF
rm -rf "$WORK/wheel" "$WORK/src"
mkdir -p "$WORK/src"
tar -C "$REPO" --exclude=__pycache__ -cf - pyproject.toml README.md edgellm | tar -C "$WORK/src" -xf -
"$HOST_PY" -m pip wheel -q --no-deps -w "$WORK/wheel" "$WORK/src" >/dev/null || die "building the edgellm wheel failed."
WHEEL=$(ls "$WORK"/wheel/edgellm-*.whl)
rm -rf "$ROOT/work/wheel" && mkdir -p "$ROOT/work/wheel" && cp "$WHEEL" "$WORK/pins.txt" "$ROOT/work/wheel/"
DEPS_STAMP="$ROOT_STAMP $(cat "$WORK/pins.txt" | tr '\n' ' ') $("$HOST_PY" -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["dependencies"])' pyproject.toml)"
if [ "$(cat "$ROOT$VENV/.edgellm-deps" 2>/dev/null)" != "$DEPS_STAMP" ]; then
  log "installing edgellm's core into the arm64 venv (emulated pip)"
  rm -rf "$ROOT$VENV"
  in_root python3 -m venv "$VENV" || die "python3 -m venv failed in the arm64 root."
  pip_config_into_root
  for path in "${PIP_BINDS[@]}"; do bind_ro "$path" "$path" || die "cannot bind-mount $path into the root."; done
  # (pip warns about every project a secondary local index lacks: noise, filtered)
  in_root python -m pip install -q -c /work/wheel/pins.txt "/work/wheel/$(basename "$WHEEL")[constrained]" pytest onnx jsonschema 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; } \
    || die "pip install in the arm64 root failed (see above)."
  for path in "${PIP_BINDS[@]}"; do unmount_under "$ROOT$path"; done
  echo "$DEPS_STAMP" > "$ROOT$VENV/.edgellm-deps"
fi
in_root python -m pip install -q --no-index --no-deps --force-reinstall "/work/wheel/$(basename "$WHEEL")" \
  || die "installing this checkout's edgellm wheel in the arm64 root failed."
in_root python -c 'import platform, onnxruntime, edgellm; print("test_arm64:", platform.machine(), "python", platform.python_version(), "onnxruntime", onnxruntime.__version__, "edgellm", edgellm.__version__)' \
  || die "import edgellm failed in the arm64 root."
phase_done venv "$t"

# ---- 4. x86 side: the tiny test models and the reference decode ---------------------------------------------------
t=$(date +%s)
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
TINY_KEY=$(cat tests/conftest.py $(find edgellm -name '*.py' | sort) | sha256sum | cut -c1-16)
if [ "$(cat "$WORK/tiny-models/.key" 2>/dev/null)" != "$TINY_KEY" ]; then
  "$HOST_PY" scripts/arm64/export_tiny_models.py "$WORK/tiny-models" >/dev/null 2>"$WORK/export.log" \
    || { tail -n 20 "$WORK/export.log"; die "exporting the tiny test models failed (x86); log: $WORK/export.log"; }
  echo "$TINY_KEY" > "$WORK/tiny-models/.key"
fi
if [ ! -f "$MODEL/edgellm.json" ]; then
  log "converting the default model into $MODEL (x86, once)"
  "$HOST_PY" -m edgellm.cli convert smollm2-135m-instruct -o "$MODEL" --precision int8 --quiet \
    || die "converting the default model failed."
fi
"$HOST_PY" scripts/arm64/greedy_check.py decode "$MODEL" "$WORK/x86.json" --new-tokens "$NEW_TOKENS" \
  --threads "$THREADS" 2>/dev/null || die "the x86 reference decode failed."
phase_done x86_reference "$t"

# ---- 5. arm64 side: the real model, then the runtime tests --------------------------------------------------------
rm -rf "$ROOT/work/src" "$ROOT/work/tiny" "$ROOT/work/out" "$WORK/arm64.json" "$WORK/junit.xml"
mkdir -p "$ROOT/work/src" "$ROOT/work/out"
tar -C "$REPO" --exclude=__pycache__ -cf - pyproject.toml tests scripts/arm64 | tar -C "$ROOT/work/src" -xf -
cp -r "$WORK/tiny-models" "$ROOT/work/tiny"
bind_ro "$(readlink -f "$MODEL")" /work/model || die "cannot bind-mount $MODEL into the root."

t=$(date +%s)
log "decoding $NEW_TOKENS tokens x 8 prompts with the real model on arm64 (emulated: a few s/token)"
in_root python /work/src/scripts/arm64/greedy_check.py decode /work/model /work/out/arm64.json \
  --new-tokens "$NEW_TOKENS" --threads "$THREADS" || log "the arm64 decode failed (see above)"
phase_done arm64_model "$t"
unmount_under "$ROOT/work/model"

t=$(date +%s)
log "runtime tests on arm64: pytest tests/runtime (tiny models exported on x86)"
in_root sh -c 'cd /work/src && EDGELLM_TEST_TINY_MODELS=/work/tiny python -m pytest -q -p no:cacheprovider \
  -m "not integration" --junitxml=/work/out/junit.xml tests/runtime' || log "runtime tests on arm64 failed (see above)"
phase_done arm64_tests "$t"
cp "$ROOT"/work/out/* "$WORK/" 2>/dev/null || true

WALLS+=(--wall "total=$(( $(date +%s) - STARTED ))")
[ -f "$WORK/arm64.json" ] || die "the arm64 decode wrote no results, so x86 and arm64 cannot be compared."
"$HOST_PY" scripts/arm64/greedy_check.py compare "$WORK/x86.json" "$WORK/arm64.json" "$WORK/results.json" \
  --junit "$WORK/junit.xml" "${WALLS[@]}"
}
