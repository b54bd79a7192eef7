# Sourced by benchmarks/gpu_session.sh: the `mm` step (issue 59's images into Qwen3.5-MoE on a GPU), one device
# command. (Not a script of its own: it uses the main script's REPO, OUT, PY, MODE, DEV, cmd, run_pytest_files, and
# carry.sh's resolve_commit.)
#
# mm_gpu: tests/engine/test_gpu_multimodal.py (1 test, the tiny Qwen3.5-MoE multimodal checkpoint in fp32 on CUDA with
#   the Triton kernels, its vision tower on the GPU, one engine: one image and two images against transformers'
#   float64 greedy tokens on CPU, the same image again a prefix-cache hit, another image a miss, the same image behind
#   another prefix an encoder-cache hit: docs/multimodal.md). Compiles (the tiny hybrid: gated DeltaNet and gated full
#   attention layers): the MoE up / down at the decode and prefill buckets (4 GEMM), fp32 attention
#   decode split / no split and prefill (3 slow), the gated DeltaNet's recurrence (decode, prefill), gates, causal
#   conv prefill + state write, conv update, state checkpoint copy (~7), align, sum, merge, split plan, KV write,
#   norms, q/k norms, the 3-D rotary, router top-k, SiLU-mul (~12): 20 other for margin. Run 60 s (estimate, not yet
#   run on a GPU: the same checks take 12 s of CPU on a 2-core machine, of which transformers' five float64
#   generations and the checkpoint's writing ~6 s; one engine start with warm-up ~10 s on a GPU).
MM_TEST_GEMM=4
MM_TEST_SLOW=3
MM_TEST_OTHER=20
MM_TEST_RUN_S=60
# mm_encoder: benchmarks/mm_encoder.py --device cuda --side 896 --repeats 5: one engine (fp32) with a 4-block,
#   hidden-256 tower at patch 16 (an 896 x 896 image: 3,136 patches, 784 tokens), each TTFT best of 5 (new image,
#   same image behind new text, same prompt and image), the tower alone between device synchronizations, the
#   processor. Compiles: the same tiny language model's kernels as mm_gpu at the larger prompts' prefill buckets
#   (shared through the Triton cache when mm_gpu ran first, counted cold here): 4 GEMM, 3 slow, 20 other; the tower
#   is torch (transformers' modules), no Triton. Run 45 s (estimate: on a 2-core CPU the 448 x 448 run is ~25 s in
#   all, its TTFTs 0.15 s; at 896 the tower's attention over 3,136 patches dominates on CPU, not on a GPU; the engine
#   start and the checkpoint's writing ~15 s).
MM_BENCH_GEMM=4
MM_BENCH_SLOW=3
MM_BENCH_OTHER=20
MM_BENCH_RUN_S=45
MM_SIDE=896
MM_REPEATS=5
step_mm() {
  local a
  for a in "$@"; do
    echo "mm: unknown argument '$a' (none taken)" >&2
    exit 2
  done
  resolve_commit
  run_pytest_files "gpu_mm_${DEV}_${COMMIT}.txt" \
    mm_gpu "$MM_TEST_GEMM" "$MM_TEST_SLOW" "$MM_TEST_OTHER" "$MM_TEST_RUN_S" tests/engine/test_gpu_multimodal.py
  if [[ $MODE == cpu-smoke ]]; then  # (the pytest part skips on CPU: its plumbing, not its checks)
    cmd mm_encoder 0 0 0 90 -- "$PY" -m moelink.benchmarks.mm_encoder --device cpu --side 64 --repeats 1 \
      --json "$OUT/mm_encoder_${DEV}_${COMMIT}.json"
    return 0
  fi
  cmd mm_encoder "$MM_BENCH_GEMM" "$MM_BENCH_SLOW" "$MM_BENCH_OTHER" "$MM_BENCH_RUN_S" -- \
    "$PY" -m moelink.benchmarks.mm_encoder --device cuda --side "$MM_SIDE" --repeats "$MM_REPEATS" \
    --json "$OUT/mm_encoder_${DEV}_${COMMIT}.json"
}
