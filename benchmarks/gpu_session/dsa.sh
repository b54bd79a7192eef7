# Sourced by benchmarks/gpu_session.sh: the `dsa` step (issue 43's benchmark on a GPU), one device command.
# (Not a script of its own: it uses the main script's OUT, PY, MODE, DEV, cmd, and carry.sh's resolve_commit /
# stamp_commit.)
#
# dsa: benchmarks/dsa_decode.py: one layer's decode attention at DeepSeek-V3.2's shapes (128 heads, latent 512 + rope
# 64; indexer 64 x 128, top-2048), dense MLA beside DSA (the indexer's scores + top-k, then sparse MLA), at 8k / 32k /
# 128k context, batch 1 and 32, bf16 and fp8 caches (fp8 index keys with per-128 scales): bytes each path reads
# (counted) and time per step (CUDA events, eager and CUDA-graph replays), the top-k's one-program and split paths
# side by side. Its JSON and log under $OUT: dsa_decode_<device>_<commit>.json / .log.
# Compiles (estimates from the sm_90 compile report's dsa and mla families, not yet run on a GPU):
#   GEMM 16: dense MLA decode (the unsplit kernel at batch 32, the split-plan kernel at batch 1) and sparse MLA
#     (unsplit, split) for bf16 and fp8 caches, the indexer scores for both key dtypes; counted 16 for margin.
#   slow 6: the radix top-k's three kernels (one program per row; the split path's partial and merge: 2.7, 1.2 and
#     1.3 s cold in the compile report, SLOW_OTHER_KERNELS), twice each for margin (one per key dtype before).
#   other 6: the split plan, MLA's plan merge and Z merge per cache dtype.
#   run 150 s: 12 points (3 contexts x 2 batches x 2 caches), each 4 timings x 20 iterations and 2 graph captures;
#     the caches of batch 32 at 128k (4.8 GB latent + 1 GB keys in bf16) filled on the device; margin.
# The benchmark starts no point in the last 60 s of the budget (--time-budget-s) and writes its JSON after each.
DSA_GEMM=16
DSA_SLOW=6
DSA_OTHER=6
DSA_RUN_S=150
step_dsa() {
  local a
  for a in "$@"; do
    echo "dsa: unknown argument '$a' (none taken)" >&2
    exit 2
  done
  if [[ $MODE == cpu-smoke ]]; then
    cmd dsa_decode 0 0 0 90 -- "$PY" -m moelink.benchmarks.dsa_decode --cpu-smoke --json "$OUT/dsa_decode_${DEV}.json"
    return 0
  fi
  resolve_commit
  local name="dsa_decode_${DEV}_${COMMIT}" budget_s
  budget_s=$(budget "$DSA_GEMM" "$DSA_SLOW" "$DSA_OTHER" "$DSA_RUN_S")
  local args=(-m moelink.benchmarks.dsa_decode --time-budget-s $((budget_s - 60)) --json "$OUT/$name.json")
  if [[ $MODE == dry-run ]]; then
    cmd dsa_decode "$DSA_GEMM" "$DSA_SLOW" "$DSA_OTHER" "$DSA_RUN_S" -- "$PY" "${args[@]}"
    return 0
  fi
  cmd dsa_decode "$DSA_GEMM" "$DSA_SLOW" "$DSA_OTHER" "$DSA_RUN_S" -- \
    bash -c 'set -o pipefail; PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "'"$OUT/$name.log"'"' _ "$PY" "${args[@]}"
  stamp_commit "$OUT/$name.json"
}
