# Sourced by benchmarks/gpu_session.sh: the `dsv4` step (issue 45's decode benchmark on a GPU), one device command.
# (Not a script of its own: it uses the main script's OUT, PY, MODE, DEV, cmd, and carry.sh's resolve_commit /
# stamp_commit.)
#
# dsv4: benchmarks/compressed_attention_decode.py --gpu: one DeepSeek-V4 layer's decode attention at V4-Flash's shapes (64 heads of
# 512, window 128; CSA: index top-512 over ctx / 4 entries; HCA: ctx / 128 entries), on the Triton kernels in bf16 as
# the engine's batched decode path runs them, beside DeepSeek-V3's MLA decode (128 heads, latent 512 + rope 64) over
# the same context, at 32k / 128k context and batch 1 / 32: time per step (CUDA events, eager and CUDA-graph replays)
# and bytes. Its JSON and log under $OUT: dsv4_decode_<device>_<commit>.json / .log.
# Compiles (estimates from the sm_90 compile report's dsv4, dsa and mla families, not yet run on a GPU):
#   GEMM 6: the sink attention (one variant: BLOCK_H 512), the indexer scores, MLA decode (unsplit at batch 32, the
#     split-plan kernel at batch 1), counted 6 for margin.
#   slow 3: the radix top-k's three kernels (one program per row at batch 32; the split path at batch 1).
#   other 4: the split plan, MLA's plan merge and Z merge, margin.
#   run 120 s: 4 points x 3 paths x (20 eager + 20 replayed iterations) and a graph capture each; the MLA cache of
#     batch 32 at 128k (4.8 GB) filled on the device; margin.
# The benchmark starts no point in the last 60 s of the budget (--time-budget-s) and writes its JSON after each.
DSV4_GEMM=6
DSV4_SLOW=3
DSV4_OTHER=4
DSV4_RUN_S=120
step_dsv4() {
  local a
  for a in "$@"; do
    echo "dsv4: unknown argument '$a' (none taken)" >&2
    exit 2
  done
  if [[ $MODE == cpu-smoke ]]; then
    cmd dsv4_decode 0 0 0 90 -- "$PY" -m moelink.benchmarks.compressed_attention_decode --cpu-smoke --json "$OUT/dsv4_decode_${DEV}.json"
    return 0
  fi
  resolve_commit
  local name="dsv4_decode_${DEV}_${COMMIT}" budget_s
  budget_s=$(budget "$DSV4_GEMM" "$DSV4_SLOW" "$DSV4_OTHER" "$DSV4_RUN_S")
  local args=(-m moelink.benchmarks.compressed_attention_decode --gpu --time-budget-s $((budget_s - 60)) --json "$OUT/$name.json")
  if [[ $MODE == dry-run ]]; then
    cmd dsv4_decode "$DSV4_GEMM" "$DSV4_SLOW" "$DSV4_OTHER" "$DSV4_RUN_S" -- "$PY" "${args[@]}"
    return 0
  fi
  cmd dsv4_decode "$DSV4_GEMM" "$DSV4_SLOW" "$DSV4_OTHER" "$DSV4_RUN_S" -- \
    bash -c 'set -o pipefail; PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "'"$OUT/$name.log"'"' _ "$PY" "${args[@]}"
  stamp_commit "$OUT/$name.json"
}
