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
# A loopback head (start_head.sh --node-ip 127.0.0.1): this driver needs Ray's one-node setting
# too, or Ray swaps 127.0.0.1 for the host's routable address and finds no raylet there (the
# ranks inherit the setting from `ray start`, and rendezvous on 127.0.0.1; see start_head.sh).
ARGS=("$@") RAY_ADDR=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  case "${ARGS[i]}" in
    --ray-address) RAY_ADDR="${ARGS[i + 1]:-}" ;;
    --ray-address=*) RAY_ADDR="${ARGS[i]#--ray-address=}" ;;
  esac
done
case "${RAY_ADDR%:*}" in
  127.0.0.1|localhost)
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}" ;;
esac
MOELINK=${MOELINK:-moelink}
exec "$MOELINK" serve "$@"
