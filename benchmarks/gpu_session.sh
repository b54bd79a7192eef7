#!/usr/bin/env bash
# Everything a GPU session owes the project (issue 3 and the README's GPU tables), in steps that each fit
# one device command (the device tool stops a command at 10 minutes; a lease holds 30 minutes in all).
#
# Assumes: the device image (torch 2.11, Triton 3.6, transformers, grpcio; no Ray, no registry), run from
# the repository root. Installs moelink without dependencies, then runs one step (or all), writing under
# $OUT (default benchmarks/results):
#
#   OUT=$OUT bash benchmarks/gpu_session.sh tests            # pytest -m gpu: kernels, engine (graphs), comm, moe
#   OUT=$OUT bash benchmarks/gpu_session.sh moe [SHAPES] [--quick]   # moe_kernels (SHAPES: comma list, default all three)
#   OUT=$OUT bash benchmarks/gpu_session.sh decode [--quick]         # engine_decode, eager and as graph replays
#   OUT=$OUT bash benchmarks/gpu_session.sh all [--quick]    # the three in a row (--quick: fewer shapes/tokens)
#
# The server tests need smg-grpc-proto (not in the image) and are CPU-covered, so they are not run here.
set -euo pipefail
OUT=${OUT:-benchmarks/results}
STEP=${1:-all}
mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation -e . >/dev/null
DEV=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
echo "device: $DEV, step: $STEP"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv | tee "$OUT/gpu_${DEV}_nvidia_smi.csv"

FAILED=0
run_tests() {  # a failing GPU test is reported and the benchmarks still run (exit status 1 at the end)
  python -m pytest -q -m gpu tests/kernels tests/engine tests/comm tests/moe 2>&1 | tee "$OUT/gpu_tests_${DEV}.txt" \
    || { echo "GPU tests failed: see $OUT/gpu_tests_${DEV}.txt"; FAILED=1; }
}
run_moe() {  # args: [SHAPES] [--quick], in any order
  local shapes=qwen3-30b-a3b,mixtral-8x7b,deepseek-v3 tokens=() a
  for a in "$@"; do
    case "$a" in
      --quick) tokens=(--tokens 1,64,1024,16384) ;;
      "") ;;
      *) shapes=$a ;;
    esac
  done
  local tag=${shapes//,/_}
  python -m moelink.benchmarks.moe_kernels --shapes "$shapes" "${tokens[@]}" --out "$OUT/moe_kernels_${DEV}_${tag}.json"
}
run_decode() {  # args: [--quick]
  local batches=()
  [[ "${1:-}" == "--quick" ]] && batches=(--batches 1,64,256)
  python -m moelink.benchmarks.engine_decode --graphs "${batches[@]}" --out "$OUT/engine_decode_${DEV}.json"
}

case "$STEP" in
  tests) run_tests ;;
  moe) run_moe "${@:2}" ;;
  decode) run_decode "${@:2}" ;;
  all) run_tests; run_moe "${@:2}"; run_decode "${@:2}" ;;
  *) echo "step must be tests, moe, decode or all (got '$STEP')" >&2; exit 2 ;;
esac
exit "$FAILED"
