#!/usr/bin/env bash
# The device check, one command, on the GPU machine from the project root after
# .ci/gpu/stage.sh:   bash .gpu/on_device.sh [tests|sanitizer|bench|peer|all]
# - tests: the GPU test binary (tests/gpu.rs: every kernel path against the CPU backend and
#   the f64 reference, occupancy API vs compile report), a missing GPU being a failure;
# - sanitizer: compute-sanitizer memcheck and racecheck on one small case;
# - bench: `flashpage bench --backend cuda` (the GPU decode matrix);
# - peer: FlashInfer and PyTorch on the same matrix (flashinfer_peer.py).
# Kernels come from .gpu/kernel-cache (built by `flashpage kernels --cache`): the tests fail
# if any kernel had to be compiled here. Logs go to $OUT (default /tmp/out); a summary last.
set -uo pipefail
what="${1:-all}"
export PYTHONUNBUFFERED=1 FLASHINFER_CUDA_ARCH_LIST=9.0a MAX_JOBS=16 RUST_BACKTRACE=1
export FLASHPAGE_REQUIRE_GPU=1
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
if [ -d .gpu/kernel-cache ]; then
  export FLASHPAGE_CUDA_CACHE="$PWD/.gpu/kernel-cache" FLASHPAGE_REQUIRE_CACHE=1
else
  echo "warning: no .gpu/kernel-cache: kernels will be compiled on the device"
fi
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv,noheader
status=0
summary=()
t0=$SECONDS
step() { summary+=("$1: $2 ($(( SECONDS - t0 )) s elapsed)"); }
want() { [ "$what" = "$1" ] || [ "$what" = all ]; }
gpu_tests=$(ls .gpu/tests/gpu-* 2>/dev/null | head -1)

if want tests; then
  echo "== GPU tests against the CPU backend"
  if [ -x "$gpu_tests" ]; then
    timeout 240 "$gpu_tests" --test-threads=1 2>&1 | tee "$OUT/tests.log" | grep -E "^test |test result|panicked"
    if [ "${PIPESTATUS[0]}" = 0 ]; then step tests ok; else step tests FAILED; status=1; fi
  else
    step tests "FAILED (no .gpu/tests/gpu-* binary)"; status=1
  fi
  echo "== the case suite on the GPU (every case and dtype vs the f64 reference and the CPU)"
  gpu_suite=$(ls .gpu/tests/gpu_suite-* 2>/dev/null | head -1)
  if [ -x "$gpu_suite" ]; then
    timeout 240 "$gpu_suite" --test-threads=1 2>&1 | tee "$OUT/suite.log" | grep -E "^test |test result|panicked"
    if [ "${PIPESTATUS[0]}" = 0 ]; then step suite ok; else step suite FAILED; status=1; fi
  else
    step suite "FAILED (no .gpu/tests/gpu_suite-* binary)"; status=1
  fi
fi
if want sanitizer; then
  san=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool (sanitizer_small_case)"
    if [ -x "$gpu_tests" ] && [ -x "$san" ]; then
      timeout 180 "$san" --tool "$tool" --error-exitcode 9 "$gpu_tests" --test-threads=1 --exact sanitizer_small_case 2>&1 \
        | tee "$OUT/sanitizer-$tool.log" | grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|panicked|Error"
      if [ "${PIPESTATUS[0]}" = 0 ]; then step "$tool" ok; else step "$tool" FAILED; status=1; fi
    else
      step "$tool" "FAILED (no test binary or compute-sanitizer)"; status=1
    fi
  done
fi
if want bench; then
  echo "== flashpage bench --backend cuda"
  timeout 240 ./.gpu/flashpage bench --backend cuda 2>&1 | tee "$OUT/bench.log"
  if [ "${PIPESTATUS[0]}" = 0 ]; then step bench ok; else step bench FAILED; status=1; fi
fi
if want peer && ls .gpu/whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl \
    && export PYTHONPATH=/tmp/site
  echo "== FlashInfer peer (JIT compile takes ~2-3 min)"
  timeout 300 python3 .gpu/flashinfer_peer.py --json "$OUT/peer.json" 2>&1 | grep -v -E "ninja|nvcc|^\[" | tee "$OUT/peer.log"
  if [ "${PIPESTATUS[0]}" = 0 ]; then step peer ok; else step peer FAILED; status=1; fi
fi
echo "== summary"
printf '%s\n' "${summary[@]}" | tee "$OUT/summary.txt"
exit $status
