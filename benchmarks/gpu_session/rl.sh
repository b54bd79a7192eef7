# Sourced by benchmarks/gpu_session.sh: the `rl` step (issue 58's GPU cost of batch-invariant mode), one device
# command. (Not a script of its own: it uses the main script's REPO, OUT, PY, MODE, DEV, cmd, and carry.sh's
# resolve_commit / stamp_commit.)
#
# rl: benchmarks/batch_invariant.py on the GPU: the engine as it runs normally (the Triton kernels, decode graphs)
# beside `batch_invariant=True` (on CUDA the batch_invariant_triton backend: kernels/batch_invariant_triton.py's
# fixed-config Triton attention, fused MoE, RMSNorm and linears, the other ops on the mode's plain-torch forms), the
# same tiny random Qwen3-MoE and prompts (32 x 64 tokens, 32 out, 3 rounds after a warm-up), which backend each arm
# ran, whether each replayed decode graphs (the invariant one now does too: engine/rank/graph_policy.py), and whether a
# request is bitwise equal alone and batched in each arm: the ratio against the goal of <= 1.05x
# (docs/rl.md). Its JSON is named by device and commit: batch_invariant_<device>_<commit>.
# Compiles: the normal arm's tiny-model Triton kernels: the MoE up / down at the decode and prefill buckets (4 GEMM),
#   attention decode split / no split and prefill in the model dtype (4 GEMM-class), KV write, norms, rotary, router
#   top-k, SiLU-mul, align, sum, merge (~20 other); the invariant arm's: the MoE up / down on its one config and the
#   fixed-tile matmul at the model's few (K, N) shape classes (~5 GEMM), attention split + merge, norms, align, sum
#   (~8 other); counted 14 + 34 for margin.
#   run 75 s (measured on an H100: 47 s and 60 s on 2026-11-26, 52 s on 2026-11-27, the whole command with its
#   cold compiles; the invariant arm now also captures its decode graphs, a few seconds, and its rounds should
#   shrink): two engine starts (~20 s each with warm-up and graphs), 4 rounds each of a 32-request batch.
RL_GEMM=14
RL_OTHER=34
RL_RUN_S=75
# bi_graphs_gpu: tests/engine/test_gpu_batch_invariant_graphs.py (1 test, tiny Qwen3-MoE in bf16: the eager invariant
#   engine, then one with decode graphs at 1/2/4/8; a 509-token prompt decoding across the 512-key split edge alone
#   and among 5 others). Compiles (the invariant backend in bf16): attention split (1 GEMM-class), MoE up / down (2),
#   the fixed-tile matmul at ~2 row classes (2); merge, align, sum, norms, fused decode input, KV write, router
#   top-k, SiLU-mul (10 other). Run 40 s: two tiny engine starts (~10 s each with warm-up; the second captures 4
#   graphs), 2,700 prompt tokens and ~40 decode steps.
BIG_GEMM=5
BIG_OTHER=10
BIG_RUN_S=40
# batch_invariant_full: the same benchmark at Qwen3-30B-A3B's shape (--shape qwen3-30b-a3b: random weights, bf16),
#   24 of its 48 layers (a decode step of 32 rows then reads ~30 GB of weights, ~10 ms of GPU work against ~1 ms of
#   host work per step), no probe (the tiny run probed this device). Compiles: the normal arm's MoE up / down at the
#   decode and prefill buckets of the tuned table (4), attention decode split / no split and prefill (3); the
#   invariant arm's MoE up / down (2), attention split (1), the fixed-tile matmul at 3 row classes (3): 13 GEMM;
#   ~18 other (align, sum, merges, split plan, norms, rotary / KV write, router top-k, SiLU-mul, both arms). Run
#   60 s (estimated, never run yet: two starts with 24 random layers, warm-up and graph capture, ~10 s each; 4
#   rounds of 32 prompts x (64 in, 32 out) at ~0.5 s normal, ~1.5 s invariant; the alone checks).
FULL_GEMM=13
FULL_OTHER=18
FULL_RUN_S=60
FULL_LAYERS=24
# sleep_mode_gpu: tests/engine/test_gpu_sleep_mode.py (1 test, tiny Qwen3-MoE in fp32 with decode graphs at 1/2/4:
#   sleep(1) frees the device bytes it reports, wake_up captures the graphs again and gives the same greedy tokens,
#   sleep(2) + an update from disk + wake_up serve the new checkpoint). Compiles: MoE up/down at the decode and
#   prefill buckets (4 GEMM), fp32 attention decode split / no split and prefill (3 slow), ~10 other; run 30 s
#   (measured on an H100, 2026-11-27: 29.7 s with three engine starts), 45 s for margin.
SLEEP_GEMM=4
SLEEP_SLOW=3
SLEEP_OTHER=10
SLEEP_RUN_S=45
step_rl() {
  local a
  for a in "$@"; do
    echo "rl: unknown argument '$a' (none taken)" >&2
    exit 2
  done
  if [[ $MODE == cpu-smoke ]]; then
    cmd batch_invariant 0 0 0 60 -- "$PY" -m moelink.benchmarks.batch_invariant --cpu-smoke \
      --out "$OUT/batch_invariant_${DEV}.json"
    return 0
  fi
  resolve_commit
  local name="batch_invariant_${DEV}_${COMMIT}"
  cmd batch_invariant "$RL_GEMM" 0 "$RL_OTHER" "$RL_RUN_S" -- "$PY" -m moelink.benchmarks.batch_invariant \
    --out "$OUT/$name.json"
  [[ $MODE == run ]] && stamp_commit "$OUT/$name.json"
  run_pytest_files "gpu_sleep_mode_${DEV}_${COMMIT}.txt" \
    sleep_mode_gpu "$SLEEP_GEMM" "$SLEEP_SLOW" "$SLEEP_OTHER" "$SLEEP_RUN_S" tests/engine/test_gpu_sleep_mode.py \
    bi_graphs_gpu "$BIG_GEMM" 0 "$BIG_OTHER" "$BIG_RUN_S" tests/engine/test_gpu_batch_invariant_graphs.py
  cmd batch_invariant_full "$FULL_GEMM" 0 "$FULL_OTHER" "$FULL_RUN_S" -- "$PY" -m moelink.benchmarks.batch_invariant \
    --shape qwen3-30b-a3b --layers "$FULL_LAYERS" --skip-probe --out "$OUT/${name}_qwen3-30b-a3b.json"
  [[ $MODE == run ]] && stamp_commit "$OUT/${name}_qwen3-30b-a3b.json"
  return 0
}
