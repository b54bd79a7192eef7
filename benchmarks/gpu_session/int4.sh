# Sourced by benchmarks/gpu_session.sh: the `int4` step (issue 44's W4A16 MoE on a GPU), one device command.
# (Not a script of its own: it uses the main script's OUT, PY, MODE, DEV, cmd, run_pytest_files, and carry.sh's
# resolve_commit / stamp_commit.)
#
# int4: four processes, logs and JSON under $OUT named by device and commit:
#   moe_int4_decode   benchmarks/moe_int4.py at Kimi K2.5's experts (384 x [2048, 7168], group 32, symmetric) at decode
#                     batches 1, 2, 4, 8, 16, 32, 64: the INT4 GEMVs (auto path) beside bf16 on the same values, eager and
#                     CUDA-graph replays (moe_int4_<device>_<commit>.json). GEMM 6: bf16's sorted configs at these sizes
#                     (default.json buckets 0 and 2 at 384 experts: up + down + atomic down); other 20: the two INT4
#                     GEMVs (the down GEMV's BLOCK_N narrowing gives up to 3 variants), bf16's tiny GEMVs, align (one
#                     launch class per pair-count edge: ~7 x 2), the top-k sum, the pre-pass making bf16's weights.
#                     Run 60 s: 14 points x (eager + graph) x 30 iterations, ~10 ms each at most (bf16 at 64 tokens
#                     reads ~25 GB of experts), the 34 GB bf16 copy made once on the device.
#   moe_int4_prefill  benchmarks/moe_int4.py --prefill at one rank's share of Kimi K2.5 (48 local experts, EP 8) at 1024,
#                     4096 and 16384 tokens (171, 683 and 2731 rows an expert): "int4-tile" (per-tile dequantization),
#                     "int4-dequant" (the experts dequantized once into a reused workspace, then the bf16 GEMMs) and
#                     bf16, a RATIO line per count (moe_int4_prefill_<device>_<commit>.json). GEMM 12: the INT4 up +
#                     down at 3 buckets (6), the float up + down at the float buckets these counts pick (shared by
#                     dequant and bf16: 6); other 16: align (3 counts x 2 block sizes x 2 kernels), the sum, the pre-pass
#                     (2). Run 60 s: 9 points x 3 systems, the largest ~20-60 ms a call (11.5 TFLOP).
#   int4_kernels_gpu  tests/kernels/test_triton_moe_int4_gpu.py (5 tests at Kimi's EP-8 share: GEMVs, per-tile, dequant
#                     forced and auto, with and without zero points). GEMM 8: per-tile up + down with and without zero
#                     points (4), float up + down at two buckets (4); other 16: 2 GEMVs, 2 pre-passes, align and sum per
#                     sorted call. Run 40 s: float32 oracles one expert at a time on the GPU.
#   int4_engine_gpu   tests/engine/test_int4_gpu.py (1 test: a tiny Kimi-K2.5-shaped INT4 checkpoint with its tiktoken
#                     tokenizer, GPU Triton float32 vs the CPU reference). GEMM 8: INT4 per-tile up + down at the
#                     decode buckets, float up + down of the dequant step, attention-class MLA kernels; slow 2: fp32 MLA
#                     decode / prefill; other 20: GEMVs, pre-pass, align, sum, norms, rotary, router top-k, latent write,
#                     the split plan. Run 45 s: start-up warm-up and decode graphs (1-16), the CPU run beside.
# Estimates from the sm_90 compile report's INT4 family (not yet run on a GPU); the four add up to the step budget.
INT4_DECODE_TOKENS=1,2,4,8,16,32,64
step_int4() {
  local a
  for a in "$@"; do
    echo "int4: unknown argument '$a' (none taken)" >&2
    exit 2
  done
  if [[ $MODE == cpu-smoke ]]; then  # the step's plumbing with the benchmark's CPU counts (the kernels' interpreter
    # smoke runs are tests/benchmarks/test_moe_int4_smoke.py's); the GPU test files skip on CPU
    cmd moe_int4_decode 0 0 0 60 -- "$PY" -m moelink.benchmarks.moe_int4 --bytes --shapes kimi-k2 \
      --tokens "$INT4_DECODE_TOKENS" --out "$OUT/moe_int4_bytes_${DEV}.json"
    cmd moe_int4_prefill 0 0 0 60 -- "$PY" -m moelink.benchmarks.moe_int4 --prefill --counts --shapes kimi-k2-ep8 \
      --out "$OUT/moe_int4_prefill_counts_${DEV}.json"
    run_pytest_files "gpu_tests_int4_${DEV}.txt" \
      int4_kernels_gpu 0 0 0 30 tests/kernels/test_triton_moe_int4_gpu.py \
      int4_engine_gpu 0 0 0 30 tests/engine/test_int4_gpu.py
    return 0
  fi
  resolve_commit
  local dec="moe_int4_${DEV}_${COMMIT}" pre="moe_int4_prefill_${DEV}_${COMMIT}"
  local dargs=(-m moelink.benchmarks.moe_int4 --shapes kimi-k2 --tokens "$INT4_DECODE_TOKENS" --out "$OUT/$dec.json")
  local pargs=(-m moelink.benchmarks.moe_int4 --prefill --shapes kimi-k2-ep8 --out "$OUT/$pre.json")
  if [[ $MODE == dry-run ]]; then
    cmd moe_int4_decode 6 0 20 60 -- "$PY" "${dargs[@]}"
    cmd moe_int4_prefill 12 0 16 60 -- "$PY" "${pargs[@]}"
  else
    # Their logs are files too: the device tool returns only the tail of a command's output.
    cmd moe_int4_decode 6 0 20 60 -- \
      bash -c 'set -o pipefail; PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "'"$OUT/$dec.log"'"' _ "$PY" "${dargs[@]}"
    cmd moe_int4_prefill 12 0 16 60 -- \
      bash -c 'set -o pipefail; PYTHONUNBUFFERED=1 "$@" 2>&1 | tee "'"$OUT/$pre.log"'"' _ "$PY" "${pargs[@]}"
    stamp_commit "$OUT/$dec.json" "$OUT/$pre.json"
  fi
  run_pytest_files "gpu_tests_int4_${DEV}_${COMMIT}.txt" \
    int4_kernels_gpu 8 0 16 40 tests/kernels/test_triton_moe_int4_gpu.py \
    int4_engine_gpu 8 2 20 45 tests/engine/test_int4_gpu.py
}
