#!/usr/bin/env bash
# Stages the device check into the git-ignored .gpu/ folder, on a machine without a GPU:
#   bash .ci/gpu/stage.sh [--no-tests] [--no-peer]      (from anywhere in the repository)
# 1. The shared staging (../shared/gpu/stage.sh): release CLI and test binaries built with the
#    cuda feature, the FlashInfer peer script and wheels.
# 2. This project's on_device.sh replaces the shared one (it adds compute-sanitizer, the
#    kernel-cache requirement and runs only the GPU test binary).
# 3. The kernel cache: every variant the GPU tests and the bench launch on sm_90a, compiled
#    ahead of time by `flashpage kernels --cache` with NVRTC 13.0, the device toolkit's
#    version (the cache key includes NVRTC's major.minor), so the device compiles nothing.
# Then copy the repository with .gpu/ to the GPU machine and run, from its root:
#   bash .gpu/on_device.sh all
set -euo pipefail
root="$(git rev-parse --show-toplevel)"
cd "$root"
shared="${FLASHPAGE_SHARED_GPU:-$root/../shared/gpu}"
[ -f "$shared/stage.sh" ] || { echo "error: $shared/stage.sh not found (set FLASHPAGE_SHARED_GPU)" >&2; exit 1; }
# The shared script's own cache step builds only the default set: this script builds the full one.
FLASHPAGE_STAGE_CACHE=0 bash "$shared/stage.sh" "$@"
cp .ci/gpu/on_device.sh .gpu/on_device.sh
[ -x .gpu/flashpage ] || { echo "error: .gpu/flashpage was not built" >&2; exit 1; }

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
