#!/usr/bin/env bash
# Everything a GPU session owes the project, in one command (issue 3 and the README's GPU tables).
#
# Assumes: the device image (torch 2.11, Triton 3.6, transformers, grpcio; no Ray, no registry), run from
# the repository root. Installs moelink without dependencies, runs the GPU tests of the folders that need
# nothing beyond that image (the server tests need smg-grpc-proto and are CPU-covered anyway), then the
# kernel and decode benchmarks, and writes everything under $OUT (default benchmarks/results).
#
#   OUT=$OUT bash benchmarks/gpu_session.sh [--quick]      # --quick: fewer shapes/tokens, for a short lease
set -euo pipefail
OUT=${OUT:-benchmarks/results}
QUICK=${1:-}
mkdir -p "$OUT"
python -m pip install --no-deps --no-build-isolation -e . >/dev/null
DEV=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
echo "device: $DEV"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv | tee "$OUT/gpu_${DEV}_nvidia_smi.csv"
python -m pytest -q -m gpu tests/kernels tests/engine tests/comm tests/moe 2>&1 | tee "$OUT/gpu_tests_${DEV}.txt"
if [[ "$QUICK" == "--quick" ]]; then
  python -m moelink.benchmarks.moe_kernels --tokens 1,64,1024,16384 --out "$OUT/moe_kernels_${DEV}.json"
  python -m moelink.benchmarks.engine_decode --graphs --batches 1,64,256 --out "$OUT/engine_decode_${DEV}.json"
else
  python -m moelink.benchmarks.moe_kernels --out "$OUT/moe_kernels_${DEV}.json"
  python -m moelink.benchmarks.engine_decode --graphs --out "$OUT/engine_decode_${DEV}.json"
fi
