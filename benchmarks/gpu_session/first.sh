# Sourced by benchmarks/gpu_session.sh: the first plan, what a lease of 45 minutes runs first (issue 40 item 6:
# the first GPU hour proves the engine, not the kernels). Six device commands, most valuable first, each within
# STEP_BUDGET_S, together within FIRST_BUDGET_S on a cold Triton cache (the header's compile model):
#
#   first 1  e2e --quick          LLM.generate beside the CUDA-graph step, async scheduling on and off, gRPC serving
#   first 2  GPU engine tests     CUDA graphs vs eager, GPU vs CPU reference, MLA, speculative verify graphs, KV handoff
#   first 3  spec --quick         the oracle drafter (p 0.8, k 2) vs plain decoding, batch 4, full-size shape
#   first 4  decode --quick       engine_decode, eager and CUDA-graph steps at batch 1/64/256
#   first 5  kv-transfer --quick  a prefill process hands its KV over tcp, shm and NCCL
#   first 6  kernel smokes        bf16 MoE, FP8 MoE, MXFP4 (tiny, per-tile, dequant paths), NVFP4 (sm_100 only)
#
# Each command leaves under $OUT its log, first<N>_<what>_<device>_<commit>.log (everything it printed, whether it
# passed or not), and its results named <benchmark>_<device>_<commit>...; at most 7 files, names of [A-Za-z0-9._-].
# moelink is imported from the checkout (the PYTHONPATH shim when it is not installed: nothing is pip-installed but
# the carried serving wheels, see carry.sh). docs/gpu-sessions.md says how to run them and commit what comes back.

FIRST_BUDGET_S=2400  # 45 minutes (2,700 s) less ~50 s per device call for the tool's start and transfers
FIRST_COUNT=6
FIRST_TAGS=("" e2e_quick gpu_tests spec_quick decode_quick kv_transfer_quick kernel_smokes)
FIRST_WHAT=(""
  "engine end to end quick: LLM.generate beside the CUDA-graph step, async scheduling on and off, gRPC serving"
  "GPU engine tests: CUDA graphs vs eager in the overlapped loop, GPU vs CPU reference, MLA, speculative verify graphs, KV save/load on side streams"
  "speculative decoding quick: oracle drafter p=0.8 k=2 vs plain decoding (both loops), batch 4, Qwen3-30B-A3B shape"
  "decode quick: Qwen3-30B-A3B shape, eager and CUDA-graph decode steps at batch 1/64/256 vs the memory floor"
  "KV transfer quick: a prefill process saves a prompt's KV, this one loads it over tcp, shm and NCCL"
  "one smoke per kernel family: bf16 MoE, FP8 MoE, MXFP4 (gpt-oss-20b), NVFP4 (sm_100 and later only)")
FIRST_FILES=(""
  "engine_e2e_<device>_<commit>_quick.json"
  "gpu_tests_first_<device>_<commit>.txt (pytest's output)"
  "spec_decode_<device>_<commit>_qwen3-30b-a3b_quick.json"
  "engine_decode_<device>_<commit>.json"
  "kv_transfer_engines_<device>_<commit>.json"
  "moe_kernels_<device>_<commit>_qwen3-30b-a3b_smoke.json (+ .png), ..._fp8_smoke.json, moe_mxfp4_<device>_<commit>_smoke.json, moe_nvfp4_<device>_<commit>_smoke.json")

# first 2: the engine-level GPU tests that prove what has never run on a GPU, a selection within one command.
# (The full plan's tests-engine runs all of tests/engine/test_gpu_engine.py: 504 s budgeted.) Every generate here
# runs the overlapped step loop (async scheduling, the engine's default) on the GPU; the verify tests the serial one.
#  test_gpu_engine.py, 5 tests on 2 tiny models in fp32: qwen3_e6k3 (GQA) and dsv3_lora (MLA, latent cache): the
#    GPU engine vs the CPU reference (logprobs within 1e-3), decode graphs replayed vs eager launches (1e-4).
#    Compiles: per model the MoE up/down at the decode (BLOCK_M 16) and prefill (32) buckets = 4 GEMM, attention
#    (decode split/no split, prefill; MLA's kernel and its split) in fp32 = 3 slow, ~10 other; the tests of one
#    model share them: 8 GEMM, 6 slow, 20 other, counted as 10 + 8 + 24 for margin. Run: the first session's
#    17 tests took 60 s with their compiles (2026-11-22), these 5 the heaviest third: 40 s.
#  test_kv_pipelined.py, 1 test in the same process, last (its polling loops have no deadline of their own: a hang
#    there is pytest-timeout's, and loses nothing after it): the disaggregated KV save gathers on a side stream
#    after the rank's own work and the arrival writer lands every byte exactly. No Triton kernel; run: 5 s.
#  test_gpu_verify_graphs.py, 2 tests (qwen3_e6k3; dsv3_neox, MLA): three engines each (eager, eager with drafts,
#    graphs with drafts: b x (1 + k)-token verify graphs beside the decode graphs), outputs token-identical. Compiles
#    per model: MoE up/down at 3 buckets (decode, verify, prefill) = 6 GEMM, fp32 attention (decode, verify,
#    prefill) = 3 slow, ~11 other: 12 + 6 + 22. Run: 6 tiny engines: 40 s (estimate, not yet run on a GPU).
FIRST_TESTS_ENGINE="tests/engine/test_gpu_engine.py::test_auto_kernels_on_cuda_are_triton
tests/engine/test_gpu_engine.py::test_gpu_triton_matches_cpu_reference_fp32[qwen3_e6k3]
tests/engine/test_gpu_engine.py::test_cuda_graph_decode_matches_eager[float32]
tests/engine/test_gpu_engine.py::test_gpu_triton_matches_cpu_reference_fp32_families[dsv3_lora]
tests/engine/test_gpu_engine.py::test_cuda_graph_decode_matches_eager_mla[dsv3_lora]
tests/engine/test_kv_pipelined.py::test_on_a_gpu_the_save_copies_on_a_side_stream_and_the_load_lands_exactly"
FIRST_TESTS_VERIFY="tests/engine/test_gpu_verify_graphs.py"
step_tests_first() {
  run_pytest_files "gpu_tests_first_${DEV}.txt" \
    gpu_engine_first 10 8 24 45 "$FIRST_TESTS_ENGINE" \
    verify_graphs 12 6 22 40 "$FIRST_TESTS_VERIFY"
}

# first 6: one smoke per kernel family, each a benchmark's correctness check (every system against its reference)
# and a few timed points, at shapes the full plan measures in full:
#  bf16 MoE, Qwen3-30B-A3B experts at 1 and 1024 tokens (the tiny GEMVs, the sorted GEMMs): the moe step's counts
#    for 2 token counts, 6 GEMM + 7 other; run 40 s (the moe --quick step's 70 s for 4 counts);
#  FP8 MoE, same shape and tokens: the moe-fp8 step's counts for 2 token counts, 8 GEMM + 14 other; run 40 s;
#  MXFP4, gpt-oss-20b at 1 (the decode GEMVs), 64 (per-tile) and 1024 tokens (dequantize once): the moe-mxfp4
#    step's --quick counts (3 token counts, doubled for margin: 25 + 25); run 60 s (40 s measured for 24 points of
#    2 systems on 2 shapes, 2026-11-22; here ~15 points of 5 systems on one shape);
#  NVFP4, Qwen3-30B-A3B at 1 and 1024 tokens: 8 GEMM + 6 other, run 40 s; only where the compute capability is
#    10 or more (sm_100): on sm_90 it prints one SKIPPED line (the dequantizing W4A16 path also runs on Hopper:
#    the full plan's tests-fp8 and moe-nvfp4 steps measure it there).
# GPU_CC=9.0 (or 10.0) with --dry-run shows the command list as on such a GPU; a run reads it from torch.
nvfp4_here() {  # status 0 when the NVFP4 smoke runs on this GPU (or the capability is unknown: dry-run)
  [[ -z ${GPU_CC:-} || $GPU_CC == none ]] && return 0
  (( ${GPU_CC%%.*} >= 10 ))
}
step_kernel_smokes() {
  if [[ $MODE == cpu-smoke ]]; then  # each benchmark's own CPU smoke (the interpreter), names as on the GPU
    cmd moe_bf16_smoke 0 0 0 120 -- "$PY" -m moelink.benchmarks.moe_kernels --cpu-smoke --out "$OUT/moe_kernels_${DEV}_smoke.json"
    cmd moe_fp8_smoke 0 0 0 120 -- "$PY" -m moelink.benchmarks.moe_kernels --cpu-smoke --dtype fp8 \
      --out "$OUT/moe_kernels_${DEV}_fp8_smoke.json"
    cmd moe_mxfp4_smoke 0 0 0 150 -- "$PY" -m moelink.benchmarks.moe_mxfp4 --cpu-smoke --out "$OUT/moe_mxfp4_${DEV}_smoke.json"
    cmd moe_nvfp4_smoke 0 0 0 120 -- "$PY" -m moelink.benchmarks.moe_nvfp4 --cpu-smoke --out "$OUT/moe_nvfp4_${DEV}_smoke.json"
    return 0
  fi
  cmd moe_bf16_smoke 6 0 7 40 -- "$PY" -m moelink.benchmarks.moe_kernels --shapes qwen3-30b-a3b --tokens 1,1024 \
    --out "$OUT/moe_kernels_${DEV}_qwen3-30b-a3b_smoke.json"
  cmd moe_fp8_smoke 8 0 14 40 -- "$PY" -m moelink.benchmarks.moe_kernels --dtype fp8 --shapes qwen3-30b-a3b \
    --tokens 1,1024 --out "$OUT/moe_kernels_${DEV}_qwen3-30b-a3b_fp8_smoke.json"
  cmd moe_mxfp4_smoke 25 0 25 60 -- "$PY" -m moelink.benchmarks.moe_mxfp4 --shapes gpt-oss-20b --tokens 1,64,1024 \
    --out "$OUT/moe_mxfp4_${DEV}_smoke.json"
  if nvfp4_here; then
    [[ -z ${GPU_CC:-} ]] && echo "note: moe_nvfp4_smoke runs on sm_100 and later only (a compute capability below 10 skips it)"
    cmd moe_nvfp4_smoke 8 0 6 40 -- "$PY" -m moelink.benchmarks.moe_nvfp4 --shapes qwen3-30b-a3b --tokens 1,1024 \
      --out "$OUT/moe_nvfp4_${DEV}_smoke.json"
  else
    echo "SKIPPED moe_nvfp4_smoke: NVFP4 smoke runs on sm_100 and later only; this GPU is sm_${GPU_CC/./} (compute capability $GPU_CC). The dequantizing W4A16 path runs on Hopper too: the full plan's tests-fp8 and moe-nvfp4 measure it"
  fi
}

step_first_n() {  # N: the first plan's command N, as the step functions run it (DEV holds device and commit)
  case "$1" in
    1) step_e2e --quick ;;
    2) step_tests_first ;;
    3) step_spec --quick ;;
    4) step_decode --quick ;;
    5) step_kv_transfer --quick ;;
    6) step_kernel_smokes ;;
  esac
}

device_info() {  # sets GPU_NAME (moe_config.device_name's spelling) and GPU_CC ("9.0"; "none" without a GPU)
  GPU_NAME=cpu
  if [[ $MODE == run && -n "$PY" ]]; then
    local line
    line=$(timeout 90 "$PY" -c "import torch
ok = torch.cuda.is_available()
print(torch.cuda.get_device_name().replace(' ', '_') if ok else 'cpu', '%d.%d' % torch.cuda.get_device_capability() if ok else 'none')" 2>/dev/null)
    read -r GPU_NAME GPU_CC <<<"$line"
    GPU_NAME=$(safe_name "${GPU_NAME:-cpu}")
    GPU_CC=${GPU_CC:-none}
  elif [[ $MODE == cpu-smoke ]]; then
    GPU_NAME=cpu_smoke GPU_CC=none
  fi
  return 0
}

# first N: the outer call names the log and runs the inner one through tee (so a command that fails, or is stopped
# by the device tool, still leaves everything it printed under $OUT); the inner one runs the step.
first_main() {
  local n=${1:-}
  if [[ ! $n =~ ^[0-9]+$ ]] || ((n < 1 || n > FIRST_COUNT)) || [[ $# -gt 1 ]]; then
    echo "first: give one command number, 1 to $FIRST_COUNT (\`bash benchmarks/gpu_session.sh plan\` lists them)" >&2
    exit 2
  fi
  if [[ -n ${GPU_SESSION_FIRST_INNER:-} ]]; then  # the inner call: what the outer one found
    GPU_NAME=$GPU_SESSION_GPU_NAME GPU_CC=$GPU_SESSION_GPU_CC COMMIT=$GPU_SESSION_COMMIT COMMIT_FROM=$GPU_SESSION_COMMIT_FROM
  else
    resolve_commit
    device_info
  fi
  DEV="${GPU_NAME}_${COMMIT}"
  export PYTHONUNBUFFERED=1  # the log holds what a part printed up to the moment it was stopped
  if [[ $MODE == dry-run ]]; then
    step_first_n "$n"
    finish_step
    exit "$STATUS"
  fi
  if [[ -z ${GPU_SESSION_FIRST_INNER:-} ]]; then
    mkdir -p "$OUT"
    local log="$OUT/first${n}_${FIRST_TAGS[$n]}_${DEV}.log" flag=()
    [[ $MODE == cpu-smoke ]] && flag=(--cpu-smoke)
    GPU_SESSION_FIRST_INNER=1 GPU_SESSION_GPU_NAME=$GPU_NAME GPU_SESSION_GPU_CC=$GPU_CC GPU_SESSION_COMMIT=$COMMIT \
      GPU_SESSION_COMMIT_FROM=$COMMIT_FROM bash "$REPO/benchmarks/gpu_session.sh" "${flag[@]}" first "$n" 2>&1 | tee "$log"
    local rc=${PIPESTATUS[0]}
    echo "[gpu_session] first $n: exit $rc; log $log" | tee -a "$log"
    exit "$rc"
  fi
  say "first $n of $FIRST_COUNT: ${FIRST_WHAT[$n]}"
  say "device $GPU_NAME (compute capability $GPU_CC); commit $COMMIT (from $COMMIT_FROM); out $OUT"
  [[ $MODE == run ]] && command -v nvidia-smi >/dev/null && \
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit,driver_version --format=csv 2>/dev/null
  setup first
  step_first_n "$n"
  finish_step
  local f files=()
  for f in "$OUT"/*"_${DEV}"*.json; do [[ -f $f ]] && files+=("$f"); done
  stamp_commit "${files[@]}"
  exit "$STATUS"
}

first_plan_print() {  # the first plan's commands with their budgets (dry-run of each), then its total
  local total=0 n line b
  echo "first plan (one GPU for 45 minutes: these commands, in this order; before the lease: bash benchmarks/gpu_session.sh"
  echo "prepare, then carry [\".gpu_session/carry\"] in every call; docs/gpu-sessions.md)"
  for ((n = 1; n <= FIRST_COUNT; n++)); do
    line=$(bash "$REPO/benchmarks/gpu_session.sh" --dry-run first "$n" | grep '^STEP ')
    b=$(sed -E 's/.*total_budget_s=([0-9]+).*/\1/' <<<"$line")
    total=$((total + b))
    printf '%-28s budget %4s s   OUT=$OUT bash benchmarks/gpu_session.sh %s\n' "first $n" "$b" "first $n"
    printf '%-28s   %s\n' "" "${FIRST_WHAT[$n]}"
  done
  echo "first total $total s of device time on a cold cache (limit $FIRST_BUDGET_S s)"
  ((total <= FIRST_BUDGET_S)) || echo "first plan: $total s > $FIRST_BUDGET_S s: shorten it" >&2
}
