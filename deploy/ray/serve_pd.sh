#!/usr/bin/env bash
# Prefill/decode disaggregation on a running Ray cluster: a prefill pool and a decode pool (one `moelink serve`
# each, every one its own placement group of EP ranks) and the smg gateway in PD mode in front of them.
#
# Assumes: run on a node of the cluster that sees a GPU (started with start_head.sh / start_worker.sh); MODEL
# is a local Hugging Face checkpoint at the same path on every node; `smg` (pip install smg) is on PATH; the
# prefill pool's KV ports (--kv-port + rank, one per prefill rank) are reachable from the decode pool's nodes
# at --kv-host; off loopback both servers need the deployment's KV secret (--kv-secret-file PATH, a file no other
# user may read, the same on every node; docs/security-kv.md), and the decode server loads only from the prefill
# pool's KV ports (--kv-peers, set here). Both servers listen for gRPC on loopback only (smg beside them is their one client); the
# OpenAI API is on --http-host:--http-port. Stops everything it started (by PID) on SIGTERM/SIGINT, or when any
# of the three exits.
#
#   deploy/ray/serve_pd.sh MODEL --ray-address HEAD_IP:PORT --prefill-ep 8 --decode-ep 16 --kv-host NODE_IP --kv-secret-file PATH [--kv-port 5600] [--http-host 0.0.0.0] [--http-port 8000] [-- moelink serve flags for both]
#
# The two commands it runs (ports are its defaults):
#   moelink serve MODEL --role prefill --kv-host NODE_IP --kv-port 5600 --kv-secret-file PATH --expert-parallel-size 8 --port 50061 --no-http --ray-address HEAD_IP:PORT
#   moelink serve MODEL --role decode --kv-peers NODE_IP:5600-5607 --kv-secret-file PATH --expert-parallel-size 16 --port 50062 --no-http --ray-address HEAD_IP:PORT
#   smg launch --pd-disaggregation --prefill grpc://127.0.0.1:50061 --decode grpc://127.0.0.1:50062 --model-path MODEL ...
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: deploy/ray/serve_pd.sh MODEL --ray-address HEAD_IP:PORT --prefill-ep N --decode-ep M --kv-host NODE_IP [--kv-secret-file PATH] [--kv-port P] [--http-host H] [--http-port P] [-- moelink serve flags]" >&2
  exit 2
fi
MODEL="$1"; shift
RAY_ADDR="" PREFILL_EP=1 DECODE_EP=1 KV_HOST=127.0.0.1 KV_PORT=5600 HTTP_HOST=127.0.0.1 HTTP_PORT=8000
PREFILL_PORT=50061 DECODE_PORT=50062 EXTRA=() KV_SECRET=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --ray-address) RAY_ADDR="$2"; shift 2 ;;
    --prefill-ep) PREFILL_EP="$2"; shift 2 ;;
    --decode-ep) DECODE_EP="$2"; shift 2 ;;
    --kv-host) KV_HOST="$2"; shift 2 ;;
    --kv-port) KV_PORT="$2"; shift 2 ;;
    --kv-secret-file) KV_SECRET=(--kv-secret-file "$2"); shift 2 ;;
    --http-host) HTTP_HOST="$2"; shift 2 ;;
    --http-port) HTTP_PORT="$2"; shift 2 ;;
    --prefill-port) PREFILL_PORT="$2"; shift 2 ;;
    --decode-port) DECODE_PORT="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "serve_pd.sh: unknown option $1 (moelink serve flags for both servers go after --)" >&2; exit 2 ;;
  esac
done
RAY_ARGS=()
if [[ -n "$RAY_ADDR" ]]; then
  RAY_ARGS=(--ray-address "$RAY_ADDR")
  case "${RAY_ADDR%:*}" in  # a loopback head: keep Ray on loopback (see serve.sh)
    127.0.0.1|localhost) export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}" ;;
  esac
fi
MOELINK=${MOELINK:-moelink}
SMG=${SMG:-smg}
LOGS=$(mktemp -d "${TMPDIR:-/tmp}/moelink-pd.XXXXXX")
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 143' TERM INT

wait_serving() {  # $1 log file, $2 pid: bounded wait for "moelink: serving" (weights load first)
  for _ in $(seq 1 1800); do
    grep -q "^moelink: serving" "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "serve_pd.sh: server $2 exited; its log: $1" >&2; tail -20 "$1" >&2; exit 1; }
    sleep 1
  done
  echo "serve_pd.sh: server $2 not serving after 30 min; its log: $1" >&2; exit 1
}

KV_PEER_HOST="$KV_HOST"; [[ "$KV_HOST" == *:* ]] && KV_PEER_HOST="[$KV_HOST]"  # an IPv6 address: in brackets
KV_PEERS="$KV_PEER_HOST:$KV_PORT-$((KV_PORT + PREFILL_EP - 1))"  # the prefill ranks' KV ports, nothing else
"$MOELINK" serve "$MODEL" --role prefill --kv-host "$KV_HOST" --kv-port "$KV_PORT" "${KV_SECRET[@]}" \
  --expert-parallel-size "$PREFILL_EP" --host 127.0.0.1 --port "$PREFILL_PORT" --no-http \
  "${RAY_ARGS[@]}" "${EXTRA[@]}" > "$LOGS/prefill.out" 2> "$LOGS/prefill.log" &
PIDS+=($!); PREFILL_PID=$!
"$MOELINK" serve "$MODEL" --role decode --kv-peers "$KV_PEERS" "${KV_SECRET[@]}" \
  --expert-parallel-size "$DECODE_EP" --host 127.0.0.1 --port "$DECODE_PORT" --no-http \
  "${RAY_ARGS[@]}" "${EXTRA[@]}" > "$LOGS/decode.out" 2> "$LOGS/decode.log" &
PIDS+=($!); DECODE_PID=$!
wait_serving "$LOGS/prefill.out" "$PREFILL_PID"
wait_serving "$LOGS/decode.out" "$DECODE_PID"
"$SMG" launch --pd-disaggregation --prefill "grpc://127.0.0.1:$PREFILL_PORT" --decode "grpc://127.0.0.1:$DECODE_PORT" \
  --model-path "$MODEL" --host "$HTTP_HOST" --port "$HTTP_PORT" --prometheus-host 127.0.0.1 \
  --prefill-policy cache_aware > "$LOGS/smg.log" 2>&1 &
PIDS+=($!)
echo "moelink PD: OpenAI API on http://$HTTP_HOST:$HTTP_PORT/v1 (prefill EP $PREFILL_EP, decode EP $DECODE_EP; logs in $LOGS)"
wait -n "${PIDS[@]}"  # any of the three gone: stop the others (cleanup) and fail
echo "serve_pd.sh: a process exited; stopping the others (logs in $LOGS)" >&2
exit 1
