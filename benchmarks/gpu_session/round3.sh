# Sourced by benchmarks/gpu_session.sh: the `round3 N` step (issue 80, GPU round 3): every row of the issue's table as
# a device command, four of them, most valuable first, each within STEP_BUDGET_S on a cold Triton cache. (Not a script
# of its own: it uses the main script's REPO, OUT, PY, MODE, DEV, cmd, budget and carry.sh's resolve_commit /
# stamp_commit.) Results are named by device and commit (<benchmark>_<device>_<commit>_round3_<what>.json), in the
# JSON fields the issue names; docs/gpu-session-steps.md says what each row reads.
#
#   round3 1  decode-size rows: the MoE at 1 / 8 / 64 tokens, sorted beside the unrolled tiny GEMVs (% of copy
#             bandwidth at 1 token: summary.frac_copy_bw_1_token, tiny_speedup_vs_moelink_triton), FP8 against bf16 at
#             1 / 64 tokens, sorted and tiny (summary.speedup_fp8_vs_bf16, speedup_fp8_tiny: the two-launch form,
#             x quantized by the norm before), the engine's decode graph step at batch 1, 4 and 256 with
#             the tiny path on up to 64 pairs (results[].graph_step_over_floor), then the tiny GEMVs' GPU tests
#   round3 2  large batches: the bf16 MoE at 4,096 / 16,384 tokens, every shape, moelink's kernels alone
#             (summary.min_frac_matmul_ge4096_tokens), and FP8 at the same counts on both FP8 shapes
#   round3 3  modes: batch-invariant mode beside the normal engine at Qwen3-30B-A3B's shape, 24 layers
#             (ratio_invariant_over_normal; gap_family_us: where its extra time is, by kernel family), and the
#             speculative verify step beside the decode step at batch 4
#   round3 4  MXFP4 against bf16 at gpt-oss-20b's experts, 1-4,096 tokens, and -120b's at 1,024 / 4,096 (vs_bf16 of the
#             mxfp4-triton rows; mxfp4-per-tile against mxfp4-dequant decides the DEQUANT buckets), then the FP8 tiny
#             GEMVs' GPU tests (round3 1 times them; 1 has no room left for their first compiled run)
#   round3 5  prefill of 64 x 2,048 tokens (the prefill rows' total_tok_s and frac_bf16_peak_active in engine_e2e's
#             rows; kernel_family_us: one more round profiled, the experts against attention and the projections),
#             then the FP8 checkpoint's decode graph step at batch 1 and 4 (results[].graph_step_over_floor of
#             engine_decode --fp8: the attention launches' e4m3 GEMVs, the experts' input from the output launch)
#
# Budgets (the header's compile model; run seconds from the last leases' logs with margin):
# round3 1: moe_small, Qwen3's table at 1 / 8 / 64 tokens: 3 configs x (up, down) = 6 GEMM; align, sum, the tiny
#   up GEMV and its down GEMV at two widths (1 token narrows to one row), ~10 other; run 50 s (2 systems x 3 counts,
#   eager + graph: the first lease's smoke took 42 s for 4 systems x 2 counts in 3 kernel families).
#   moe_fp8_small: first 6's FP8 smoke counts (8 GEMM + 14 other) and the two formats' tiny GEMVs beside them
#   (bf16-tiny, fp8-tiny and fp8-tiny-2launch, issue 80's two-launch form: x quantized beforehand as the engine's
#   norm does, h in the gate-up launch; ~6 other more, less h's group quantization at two row counts, which the
#   gate-up launch does now: 18), run 44 s (one more system at two counts: the step's 570 s exactly).
#   decode: the decode --quick step's counts (12 GEMM + 24 other; the tiny GEMVs replace the sorted ones at batch
#   1 and 4, whose compiles differ in constexprs only where one token narrows the down GEMV to one row), run 130 s
#   for three batch sizes (25 s measured for three on an H200 with a warm cache, 2026-11-27) and their profiles
#   (5 graph steps each under torch.profiler: a few seconds).
#   tiny_gpu: tests/kernels/test_triton_moe_tiny_gpu.py, the rebuilt GEMVs' first run on a GPU: 4 shapes x 3 token
#   counts against a float32 oracle, fp32 and an expert map, a CUDA graph's replay bit for bit against eager. Compiles:
#   the up GEMV per shape and dtype and the down GEMV per shape and width (one row at one token), ~22 other; run 40 s.
# round3 2: moe_large: 2 token counts x 3 shapes, one config each = 12 GEMM, 6 other; run 150 s (DeepSeek-V3's
#   22 GB of random weights drawn, 6 points x eager + graph, no per-expert loop, no check).
#   moe_fp8_large: 2 counts x 2 shapes x (FP8 + bf16) = 16 GEMM, ~16 other (quantization), run 150 s.
# round3 3: the rl step's batch_invariant_full counts (13 GEMM + 18 other, run 60 s, +10 s for --kernel-times: one
#   profiled round per arm, ~0.5 s each, and the profiler's start); spec --quick's (24 + 36, 240 s).
# round3 4: moe_mxfp4 at 5 token counts (the moe-mxfp4 step's per-count share: 43 GEMM-class + 43 other), run 120 s.
#   mxfp4_120b: gpt-oss-120b at 1,024 / 4,096 tokens, the row's other shape: the per-tile GEMMs of bucket 32 (64-row
#   blocks; bucket 128's are 20b's at 1,024 tokens, compiled the command before), the bf16 GEMMs of its two buckets,
#   the pre-pass and align / sum at its sizes: 6 GEMM + 10 other; run 60 s (the H200's quick + sweep runs of both
#   shapes took 30 s and 17 s: 6.4 GB of bf16 weights drawn and dequantized for the bf16 row).
#   fp8_tiny_gpu: test_triton_fp8_gpu.py's tiny tests (2 shapes x T 1, 8 against the float32 reference, a CUDA graph
#   each): the up and down GEMV per shape (DeepSeek's with an expert map), x's and h's quantization, ~8 other; at
#   T 1 the two-launch form against the four-launch one bit for bit (the quantizing norm per shape, the gate-up
#   GEMV with h apart and h's group quantization: ~6 other more), its graph replayed twice; run 45 s (DeepSeek's 32
#   local experts quantized on the GPU twice).
# round3 5: decode_fp8: Qwen3-30B-A3B-FP8's decode at batch 1 and 4 (the fused GEMVs' FP8 forms, the FP8 experts
#   sorted or tiny as the FP8 table picks, attention and its split merge, the router: ~8 GEMM-class and ~20 other
#   compiles), run 80 s (two batch sizes, eager + graph + 5 profiled graph steps each; the bf16 decode's three took
#   25 s warm on an H200).
# round3 5: prefill, engine_e2e's prefill workload alone, no serving (24 GEMM + 36 other: the prefill and mixed
#   buckets and the decode graphs' warm-up), run 230 s (both step loops: ~77 s start, ~5 s of generate each; 30 s
#   for --kernel-times: one more generate a loop under torch.profiler, ~24 steps x 48 layers of kernels traced).
ROUND3_COUNT=5
round3_cmds() {  # N: the commands of round3 N
  local name="${DEV}_${COMMIT}_round3"
  case "$1" in
    1)
      cmd round3_moe_small 6 0 10 50 -- "$PY" -m moelink.benchmarks.moe_kernels --shapes qwen3-30b-a3b --tokens 1,8,64 \
        --systems moelink-triton,moelink-triton-tiny --out "$OUT/moe_kernels_${name}_small.json"
      cmd round3_moe_fp8_small 8 0 18 44 -- "$PY" -m moelink.benchmarks.moe_kernels --dtype fp8 --shapes qwen3-30b-a3b \
        --tokens 1,64 --out "$OUT/moe_kernels_${name}_fp8_small.json"
      cmd round3_decode 12 0 24 130 -- "$PY" -m moelink.benchmarks.engine_decode --graphs --batches 1,4,256 --kernel-times \
        --tiny-max-pairs 64 --out "$OUT/engine_decode_${name}_tiny.json"
      run_pytest_files "gpu_tiny_${name}.txt" \
        tiny_gpu 0 0 22 40 tests/kernels/test_triton_moe_tiny_gpu.py ;;
    2)
      cmd round3_moe_large 12 0 6 150 -- "$PY" -m moelink.benchmarks.moe_kernels --tokens 4096,16384 \
        --systems moelink-triton --no-check --out "$OUT/moe_kernels_${name}_large.json"
      cmd round3_moe_fp8_large 16 0 16 150 -- "$PY" -m moelink.benchmarks.moe_kernels --dtype fp8 --tokens 4096,16384 \
        --no-check --out "$OUT/moe_kernels_${name}_fp8_large.json" ;;
    3)
      cmd round3_batch_invariant 13 0 18 70 -- "$PY" -m moelink.benchmarks.batch_invariant --shape qwen3-30b-a3b \
        --layers 24 --skip-probe --kernel-times --out "$OUT/batch_invariant_${name}_qwen3-30b-a3b.json"
      cmd round3_spec 24 0 36 240 -- "$PY" -m moelink.benchmarks.spec_decode --shape qwen3-30b-a3b --batch 4 --p 0.8 \
        --k 2 --tokens 64 --repeats 1 --out "$OUT/spec_decode_${name}_qwen3-30b-a3b.json" ;;
    4)
      cmd round3_mxfp4 43 0 43 120 -- "$PY" -m moelink.benchmarks.moe_mxfp4 --shapes gpt-oss-20b \
        --tokens 1,16,64,1024,4096 --out "$OUT/moe_mxfp4_${name}.json"
      cmd round3_mxfp4_120b 6 0 10 60 -- "$PY" -m moelink.benchmarks.moe_mxfp4 --shapes gpt-oss-120b \
        --tokens 1024,4096 --out "$OUT/moe_mxfp4_${name}_120b.json"
      run_pytest_files "gpu_fp8_tiny_${name}.txt" \
        fp8_tiny_gpu 0 0 14 45 tests/kernels/test_triton_fp8_gpu.py::test_fused_moe_fp8_tiny_at_model_shapes ;;
    5)
      cmd round3_prefill 24 0 36 230 -- "$PY" -m moelink.benchmarks.engine_e2e --models qwen3-30b-a3b --dtypes bf16 \
        --workloads prefill --no-serve --kernel-times --time-budget-s $(( $(budget 24 0 36 230) - 120 )) \
        --out "$OUT/engine_e2e_${name}_prefill.json"
      cmd round3_decode_fp8 8 0 20 80 -- "$PY" -m moelink.benchmarks.engine_decode --fp8 --graphs --batches 1,4 \
        --kernel-times --out "$OUT/engine_decode_${name}_fp8.json" ;;
  esac
}

step_round3() {
  local n=${1:-}
  if [[ ! $n =~ ^[0-9]+$ ]] || ((n < 1 || n > ROUND3_COUNT)) || [[ $# -gt 1 ]]; then
    echo "round3: give one command number, 1 to $ROUND3_COUNT (issue 80's rows; benchmarks/gpu_session/round3.sh)" >&2
    exit 2
  fi
  if [[ $MODE == cpu-smoke ]]; then
    echo "round3: no CPU smoke of its own (each benchmark's --cpu-smoke is its step's: moe, decode, rl, spec, e2e)" >&2
    exit 2
  fi
  resolve_commit
  round3_cmds "$n"
  [[ $MODE == run ]] && stamp_commit "$OUT"/*"_${DEV}_${COMMIT}_round3"*.json
  return 0
}
