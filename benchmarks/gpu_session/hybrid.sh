# Sourced by benchmarks/gpu_session.sh: the `hybrid` step (issue 42's benchmark on a GPU), one device command.
# (Not a script of its own: it uses the main script's REPO, OUT, PY, MODE, DEV, cmd, say, and carry.sh's
# resolve_commit / stamp_commit.)
#
# hybrid: benchmarks/hybrid_state.py --size gpu: a Qwen3-Next-shaped hybrid (12 gated DeltaNet + 4 gated full
# attention layers) beside a Qwen3-MoE of the same active size (16 full layers), hidden 2048, Qwen3-30B-A3B's
# experts (128, top-8, width 768) and attention (32 q / 4 kv heads of 128), random bf16 weights, both engines alive
# in one process (~21 GB of weights each): the published shapes' state and KV bytes per sequence (analytic), decode
# tok/s at batch 1 and 8 (512-token prompts, 64 out), and the unchunked prefill of one 2k, 8k and 32k prompt
# (max_num_batched_tokens 32768). Decode replays CUDA graphs where the engine captures them: the JSON's
# decode_graph_sizes says which engine did (a model with linear-attention layers decodes eagerly until the engine
# captures graphs over its state slots). Its JSON and log under $OUT are named by device and commit:
# hybrid_state_<device>_<commit>.json / .log.
# Compiles (both engines share every kernel of the same shape through the Triton cache; the MoE blocks are identical):
#   GEMM 30: the fused MoE's launch configs up to 32,768 tokens (6 distinct at this shape on an H100: kernels/
#     moe_variants.plan_moe_variants; up + down + atomic down each: 18) and the tiny path's two GEMVs; bf16 attention
#     at head dim 128 (decode split / no split, prefill plain / over a cached prefix: ~6, the hybrid's full layers
#     have the MoE model's heads); counted 30 for margin.
#   other 80: the MoE alignment (22 distinct align launches up to 32,768 tokens, 2 kernels each: 44), top-k sum,
#     router top-k and SiLU-mul (~8), KV write, split plan, merge (3), RMSNorm and the q/k norms, full and partial
#     rotary (~8), the gated DeltaNet kernels: recurrence for decode and prefill, gates, causal conv prefill + its
#     state write, conv update (~8; fla's chunked prefill where fla-core is installed, else the recurrence); counted
#     80 for margin.
#   run 240 s (estimate, not yet run on a GPU): two engine starts (dummy weights, start-up warm-up up to 32,768-token
#     steps, decode graphs for 1-8) ~60 s each, decode 2 batches x 3 repeats x 2 models ~15 s, prefill 2k x 3, 8k x
#     2, 32k x 1 per model ~20 s, the rest margin.
# The benchmark starts no measurement point in the last 90 s of the budget (--time-budget-s) and writes its JSON
# after every point, so a slow start leaves the memory part and the points done.
HYBRID_GEMM=30
HYBRID_OTHER=80
HYBRID_RUN_S=240
step_hybrid() {
  local a
  for a in "$@"; do
    echo "hybrid: unknown argument '$a' (none taken)" >&2
    exit 2
  done
  if [[ $MODE == cpu-smoke ]]; then
    cmd hybrid_state 0 0 0 90 -- "$PY" -m moelink.benchmarks.hybrid_state --cpu-smoke \
      --json "$OUT/hybrid_state_${DEV}.json"
    return 0
  fi
  resolve_commit
  local name="hybrid_state_${DEV}_${COMMIT}" budget_s
  budget_s=$(budget "$HYBRID_GEMM" 0 "$HYBRID_OTHER" "$HYBRID_RUN_S")
  local args=(-m moelink.benchmarks.hybrid_state --size gpu --time-budget-s $((budget_s - 90)) --json "$OUT/$name.json")
  if [[ $MODE == dry-run ]]; then
    cmd hybrid_state "$HYBRID_GEMM" 0 "$HYBRID_OTHER" "$HYBRID_RUN_S" -- "$PY" "${args[@]}"
    return 0
  fi
  # Its log is also a file: the device tool returns only the tail of a command's output.
  cmd hybrid_state "$HYBRID_GEMM" 0 "$HYBRID_OTHER" "$HYBRID_RUN_S" -- \
    bash -c 'set -o pipefail; PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "'"$OUT/$name.log"'"' _ "$PY" "${args[@]}"
  stamp_commit "$OUT/$name.json"
}
