#!/usr/bin/env bash
# Run `moelink serve` against a running Ray cluster (started with start_head.sh / start_worker.sh).
#
# Assumes: run on a node of the cluster (usually the head); MODEL is a local
# Hugging Face checkpoint directory present at the same path on every node
# (shared filesystem or copied); expert-parallel size = number of GPUs to use,
# one rank per GPU (placement group, packed per node). Every other flag is
# passed to `moelink serve` unchanged.
#
#   deploy/ray/serve.sh MODEL --ray-address HEAD_IP:PORT --expert-parallel-size 8 [--host 0.0.0.0 --port 50051 ...]
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: deploy/ray/serve.sh MODEL --ray-address HEAD_IP:PORT --expert-parallel-size N [moelink serve flags]" >&2
  exit 2
fi
MOELINK=${MOELINK:-moelink}
exec "$MOELINK" serve "$@"
