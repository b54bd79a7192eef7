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
#
# Addresses: Ray binds its GCS (--port) and raylet servers either to loopback only (node
# address 127.0.0.1) or to every interface (any other node address; Ray has no option to bind
# one address); firewall the Ray ports to the cluster network. --node-ip 127.0.0.1 (or
# localhost) makes a one-node cluster on loopback: Ray would otherwise swap 127.0.0.1 for this
# host's routable address and bind everywhere, so the script exports
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (which keeps 127.0.0.1; no other node can join). The rank
# actors inherit this environment: they then rendezvous on 127.0.0.1 too. MOELINK_MASTER_ADDR,
# set here (or for start_worker.sh), overrides the address a node's ranks rendezvous on and
# talk from (default: the node's Ray address). Run `moelink serve` against a loopback head with
# deploy/ray/serve.sh, which sets Ray's one-node setting for --ray-address 127.0.0.1:PORT.
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
case "$NODE_IP" in
  127.0.0.1|localhost|::1)
    NODE_IP=127.0.0.1
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    echo "start_head.sh: one-node Ray cluster on loopback (127.0.0.1:$PORT)" >&2 ;;
  127.*)
    echo "start_head.sh: --node-ip $NODE_IP: Ray binds loopback only for 127.0.0.1; use that" >&2; exit 2 ;;
  *)
    echo "start_head.sh: Ray head at $NODE_IP:$PORT (Ray's servers listen on every interface)" >&2 ;;
esac
RAY=${RAY:-ray}
exec "$RAY" start --head --block --node-ip-address "$NODE_IP" --port "$PORT" \
  --include-dashboard false --disable-usage-stats "${EXTRA[@]}"
