#!/usr/bin/env bash
# Stages the device check into the git-ignored .gpu/ folder, on a machine without a GPU:
#   bash .ci/gpu/stage.sh [--no-tests] [--no-peer]      (from anywhere in the repository)
# - the release CLI and the GPU test binary built with the cuda feature;
# - the peer scripts and FlashInfer wheels from ../shared/gpu (as ../shared/gpu/stage.sh
#   stages them; that script is not called because it assumes .git is a directory, which a
#   git worktree's is not);
# - this project's on_device.sh (GPU tests, compute-sanitizer, bench, peer);
# - the kernel cache: every variant the GPU tests and the bench launch on sm_90a, compiled
#   ahead of time by `flashpage kernels --cache` with NVRTC 13.0, the device toolkit's
#   version (the cache key includes NVRTC's major.minor), so the device compiles nothing.
# Then copy the repository with .gpu/ to the GPU machine and run, from its root:
#   bash .gpu/on_device.sh all
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
shared="${FLASHPAGE_SHARED_GPU:-$root/../shared/gpu}"
[ -f "$shared/flashinfer_peer.py" ] || { echo "error: $shared/flashinfer_peer.py not found (set FLASHPAGE_SHARED_GPU)" >&2; exit 1; }
want_tests=1; want_peer=1
for a in "$@"; do
  case "$a" in
    --no-tests) want_tests=0 ;;
    --no-peer) want_peer=0 ;;
    *) echo "error: unknown option $a (expected --no-tests, --no-peer)" >&2; exit 2 ;;
  esac
done
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")" .gpu/tests
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
cp "$shared/cases.py" "$shared/flashinfer_peer.py" .gpu/
cp .ci/gpu/on_device.sh .gpu/on_device.sh

if [ "$want_peer" = 1 ] && ! ls .gpu/whl/flashinfer_python-0.5.3-*.whl >/dev/null 2>&1; then
  mkdir -p .gpu/whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .gpu/whl flashinfer-python==0.5.3 'apache-tvm-ffi>=0.1,<0.2'
fi
[ "$want_peer" = 1 ] || rm -rf .gpu/whl

cargo build --release --features cuda -p flashpage-cli --bins
cp target/release/flashpage .gpu/
rm -f .gpu/tests/*
if [ "$want_tests" = 1 ]; then
  # The GPU test binaries only (the others are CPU tests the build machines already run): the
  # backend specifics (tests/gpu.rs) and the case suite on the GPU (the same TOML suite the
  # CPU runs, through the test kit's runner).
  test_exe() {
    cargo test --release --features cuda -p "$1" --test "$2" --no-run --message-format=json \
      | python3 -c 'import json,sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("profile", {}).get("test") and m.get("executable"):
        print(m["executable"])'
  }
  for t in "flashpage gpu" "flashpage-testkit gpu_suite"; do
    exe=$(test_exe $t)
    [ -n "$exe" ] || { echo "error: the test binary $t was not built" >&2; exit 1; }
    cp "$exe" .gpu/tests/
  done
fi

venv="${FLASHPAGE_NVRTC130_VENV:-/tmp/nvrtc130-venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'nvidia-cuda-nvrtc==13.0.*'
fi
lib="$(dirname "$(find "$venv" -name 'libnvrtc.so.13' | head -1)")"
[ -f "$lib/libnvrtc.so.13" ] || { echo "error: libnvrtc.so.13 (NVRTC 13.0) not found under $venv" >&2; exit 1; }
rm -rf .gpu/kernel-cache
# Head dims of tests/gpu.rs (16, 64, 80, 128, 256): every dtype, rows per pass and RoPE.
LD_LIBRARY_PATH="$lib" ./.gpu/flashpage kernels --arch sm_90a --all \
  --head-dim 16,64,80,128,256 --cache .gpu/kernel-cache > .gpu/kernels-sm_90a.txt
LD_LIBRARY_PATH="$lib" ./.gpu/flashpage kernels --arch sm_90a --cache .gpu/kernel-cache \
  > .gpu/kernels-standard-sm_90a.txt
echo "kernel cache: $(ls .gpu/kernel-cache | wc -l) images; $(head -1 .gpu/kernels-standard-sm_90a.txt)"
du -sh .gpu
echo "staged: $(ls .gpu/tests | wc -l) test binary; copy .gpu with the repository, then: bash .gpu/on_device.sh all"
