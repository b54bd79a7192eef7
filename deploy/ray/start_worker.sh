#!/usr/bin/env bash
# Join this node to a moelink Ray cluster as a worker node.
#
# Assumes: the head was started with start_head.sh and HEAD_IP:PORT is
# reachable from here; this node's own address (--node-ip) is reachable from
# the head and the other workers (the all-to-all rendezvous uses rank 0's node
# address and the ranks talk directly). Foreground (--block); SIGTERM stops it.
#
#   deploy/ray/start_worker.sh --address HEAD_IP:PORT --node-ip 10.0.0.2 [--num-cpus N] [--num-gpus N] [--resources JSON]
# Security: a cluster reachable beyond loopback should use Ray's token auth. Generate one
# secret (`python -c "import secrets; print(secrets.token_hex(32))"`) and export it on EVERY
# node and for `moelink serve`: RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<secret>.
set -euo pipefail
ADDRESS="" NODE_IP="" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --node-ip) NODE_IP="$2"; shift 2 ;;
    --num-cpus|--num-gpus|--resources|--temp-dir) EXTRA+=("$1" "$2"); shift 2 ;;
    *) echo "start_worker.sh: unknown option $1 (allowed: --address --node-ip --num-cpus --num-gpus --resources --temp-dir)" >&2; exit 2 ;;
  esac
done
if [[ -z "$ADDRESS" ]]; then
  echo "start_worker.sh: --address HEAD_IP:PORT is required" >&2; exit 2
fi
if [[ -z "$NODE_IP" ]]; then
  NODE_IP=$(hostname -I | awk '{print $1}')
fi
case "$NODE_IP" in
  127.*|localhost|::1)
    echo "start_worker.sh: --node-ip $NODE_IP is loopback: the head and the other nodes could not reach this" \
         "node (a one-node cluster needs only start_head.sh --node-ip 127.0.0.1)" >&2; exit 2 ;;
esac
RAY=${RAY:-ray}
exec "$RAY" start --block --address "$ADDRESS" --node-ip-address "$NODE_IP" --disable-usage-stats "${EXTRA[@]}"
