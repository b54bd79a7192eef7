#!/usr/bin/env bash
# Start the Ray head of a moelink cluster on this node.
#
# Assumes: moelink is installed in the Python environment on PATH (or RAY points
# at its `ray`); this node's address is reachable by every worker node; the
# port is open between nodes. GPUs are detected by Ray; on a CPU-only node pass
# --num-cpus. Runs in the foreground with --block (what Slurm, systemd and the
# tests want); stop it with SIGTERM and Ray stops every process it started.
#
#   deploy/ray/start_head.sh --node-ip 10.0.0.1 [--port 6379] [--num-cpus N] [--num-gpus N] [--resources JSON] [--temp-dir DIR]
# Security: a cluster reachable beyond loopback should use Ray's token auth. Generate one
# secret (`python -c "import secrets; print(secrets.token_hex(32))"`) and export it on EVERY
# node and for `moelink serve`: RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<secret>.
set -euo pipefail
NODE_IP="" PORT=6379 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --node-ip) NODE_IP="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --num-cpus|--num-gpus|--resources|--temp-dir) EXTRA+=("$1" "$2"); shift 2 ;;
    *) echo "start_head.sh: unknown option $1 (allowed: --node-ip --port --num-cpus --num-gpus --resources --temp-dir)" >&2; exit 2 ;;
  esac
done
if [[ -z "$NODE_IP" ]]; then
  NODE_IP=$(hostname -I | awk '{print $1}')
fi
RAY=${RAY:-ray}
exec "$RAY" start --head --block --node-ip-address "$NODE_IP" --port "$PORT" \
  --include-dashboard false --disable-usage-stats "${EXTRA[@]}"
