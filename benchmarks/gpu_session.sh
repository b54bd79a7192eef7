#!/usr/bin/env bash
# What a lent GPU session owes the project (issues 3 and 16), one step per device command.
#
#   bash benchmarks/gpu_session.sh [--dry-run|--cpu-smoke] STEP [ARGS]
#
# A lease of 45 minutes runs the first plan first (benchmarks/gpu_session/first.sh, docs/gpu-sessions.md):
#   prepare [--no-wheels]  (here, before the lease) the commit stamp and the serving wheels into .gpu_session/carry,
#                          which every device call then carries (benchmarks/gpu_session/carry.sh)
#   first N                the first plan's command N (1-6): e2e --quick, the GPU engine tests, spec --quick,
#                          decode --quick, kv-transfer --quick, one smoke per kernel family; each leaves its log
#                          first<N>_<what>_<device>_<commit>.log and results named by device and commit
#   plan                   the first plan with its budgets and total, then every device command of a full session
#
# Steps (run from anywhere; OUT is where result files go, default benchmarks/results; on the device tool,
# OUT=$OUT so they come back):
#   preflight              python, torch (+CUDA), triton (+NVIDIA backend, ptxas), a C compiler and Python.h
#                          for Triton's launcher, pytest and its plugins, pip/setuptools for the editable
#                          install: says what is missing and what the other steps will do instead. Runs on CPU.
#   tests-kernels          pytest -m gpu: Triton kernels at model shapes, sampler seeds, comm (NCCL + graphs)
#   tests-engine           pytest -m gpu: the engine on the Triton kernels, fp32/bf16, graphs vs eager
#   tests-fp8              pytest -m gpu: the FP8 block-scaled kernels at DeepSeek-V3 and Qwen3-30B-A3B shapes,
#                          the MXFP4 fused MoE at gpt-oss-120b's, the NVFP4 one at Qwen3-30B-A3B's, MLA over an
#                          fp8 latent cache (mixed batch)
#   moe SHAPE [--quick]    moe_kernels for ONE shape (qwen3-30b-a3b | mixtral-8x7b | deepseek-v3)
#   moe-fp8 SHAPE [--quick] moe_kernels --dtype fp8 for ONE shape (deepseek-v3 | qwen3-30b-a3b): FP8 fused MoE vs bf16
#   moe-mxfp4 [--quick]    moe_mxfp4: gpt-oss-120b/-20b experts, MXFP4 paths (GEMVs, per-tile, dequant-once) vs bf16
#   moe-nvfp4 [--quick]    moe_nvfp4: Qwen3-30B-A3B / DeepSeek-V3 experts, NVFP4 (ModelOpt's, dequantized) vs bf16
#   tune SHAPE [TOKENS]    tune_moe for ONE shape into .gpu_session/tuned, then
#                          $OUT/tuned_configs_<GPU>_<SHAPE>.tar.gz (see "Tuned configs" below); its quick space
#                          searches each GEMM's PERSISTENT (0/1/2 programs per SM) and TMA (off/on) axes too
#   tune-fp8 SHAPE [TOKENS] tune_moe --dtype fp8 for ONE FP8 shape (deepseek-v3 | qwen3-30b-a3b) into
#                          .gpu_session/tuned_fp8, then $OUT/tuned_configs_fp8_<GPU>_<SHAPE>.tar.gz; prints a RATIO
#                          line (fp8 / bf16 ms) per bucket; after `unpack`, moe-fp8 measures with the tuned file.
#                          TOKENS 4096,16384 gives the goal's buckets the whole budget (a new file keeps the other
#                          buckets at the configs used until then)
#   tune-mxfp4 SHAPE [TOKENS] tune_moe --dtype mxfp4 for ONE gpt-oss shape (gpt-oss-20b | gpt-oss-120b) into
#                          .gpu_session/tuned_mxfp4, then $OUT/tuned_configs_mxfp4_<GPU>_<SHAPE>.tar.gz; per bucket
#                          per-tile against dequantize-once, then the per-tile blocks; a RATIO line (mxfp4 / bf16 ms)
#                          per bucket. TOKENS default 1024,4096 (issue 80's MXFP4 row, where DEQUANT is decided)
#   tune-invariant SHAPE   tune_moe_invariant for ONE shape: the batch-invariant mode's one MoE config, timed
#                          over round3 3's workload (32,2048 tokens weighted 31,1) into .gpu_session/tuned_invariant,
#                          then $OUT/tuned_configs_invariant_<GPU>_<SHAPE>.tar.gz; a RATIO line per count
#                          (invariant / normal engine's experts)
#   decode [--quick] [--model qwen3-30b-a3b|deepseek-v2-lite]
#                          engine_decode, eager and as CUDA-graph replays
#   e2e [--quick] [--model qwen3-30b-a3b|deepseek-v2-lite] [--dtype bf16|fp8] [--serve]
#                          engine_e2e: LLM.generate end to end beside the CUDA-graph step, async scheduling on
#                          and off (one model and dtype per command); --serve: the gRPC serving part alone;
#                          --quick: Qwen3-30B-A3B bf16, every part (serving included) in one command
#   mla-fp8-kv [--quick]   mla_fp8_kv: fp8 vs bf16 MLA latent KV cache on long prompts (DeepSeek-V2-Lite shape),
#                          the MLA kernel then LLM.generate (64 x 7,680 prompt x 256 out; --quick 16 x 64 out),
#                          each printed as `RATIO ... = fp8/bf16` (issue 27: 1.88 end to end before the fix)
#   spec [--quick] [--model qwen3-30b-a3b|deepseek-v2-lite]
#                          spec_decode: the oracle drafter (p 0, 0.8; k 2) vs plain decoding at batch 1/4/16
#                          on a full-size shape with random weights (verify graphs beside decode graphs);
#                          --quick: p 0.8 at batch 4, one timed run
#   kv-transfer [--quick]  kv_transfer_engines: a prefill process saves a prompt's KV (side-stream copy out), this
#                          one loads it (each layer written as it arrives) over tcp, shm and collective (NCCL),
#                          beside a device copy of the same bytes (issue 30; DeepSeek-V3 MLA and Qwen3 GQA KV)
#   hybrid                 hybrid_state: a Qwen3-Next-shaped hybrid (gated DeltaNet on 3 layers of 4) beside a
#                          Qwen3-MoE of the same active size, bf16: state / KV bytes per sequence, decode tok/s at
#                          batch 1 and 8, prefill of 2k / 8k / 32k prompts (issue 42; benchmarks/gpu_session/hybrid.sh)
#   dsa                    dsa_decode: DeepSeek Sparse Attention beside dense MLA, one layer's decode at DeepSeek-V3.2's
#                          shapes, 8k / 32k / 128k context, bytes and time (issue 43; benchmarks/gpu_session/dsa.sh)
#   dsv4                   dsv4_decode: DeepSeek-V4's CSA / HCA decode attention (Triton) beside DeepSeek-V3's MLA, one
#                          layer at V4-Flash's shapes, 32k / 128k context, bytes and time (issue 45; gpu_session/dsv4.sh)
#   int4                   moe_int4: the W4A16 MoE at Kimi K2.5's experts vs bf16 at decode batches 1..64, its two
#                          prefill paths (per-tile, dequantize-once) vs bf16 at one rank's share, and the INT4 GPU
#                          tests (kernels at Kimi's shape, a tiny Kimi K2.5 served) (issue 44; benchmarks/gpu_session/int4.sh)
#   rl                     batch_invariant: the engine normally and in batch-invariant mode side by side (issue 58;
#                          benchmarks/gpu_session/rl.sh): the mode's cost against the goal of <= 1.05x; then the GPU
#                          sleep-mode test (sleep / wake_up with decode graphs, tests/engine/test_gpu_sleep_mode.py),
#                          the invariant decode graphs' test (tests/engine/test_gpu_batch_invariant_graphs.py) and
#                          the benchmark again at Qwen3-30B-A3B's shape, 24 layers of random weights
#   lora                   LoRA adapters with decode CUDA graphs against eager (tests/engine/test_gpu_lora_graphs.py;
#                          issue 60, benchmarks/gpu_session/lora.sh)
#   mm                     images into Qwen3.5-MoE on the GPU (issue 59; benchmarks/gpu_session/mm.sh): the tiny
#                          multimodal checkpoint's GPU test (tests/engine/test_gpu_multimodal.py), then mm_encoder
#                          --device cuda: the tower's time per image and what the encoder / prefix caches save
#   round3 N               issue 80's table, one row group per command (1-5): decode-size MoE and the batch-1 decode
#                          graph with the tiny GEMVs, large-batch MoE every shape (bf16, FP8), batch-invariant and
#                          speculative verify, MXFP4, prefill (benchmarks/gpu_session/round3.sh)
#   compile-report         offline sm_90 compile report (benchmarks/compile_report.py; needs no GPU)
#   unpack FILE...         (here, after the session) tuned tarballs -> kernels/configs/, each file checked
#   all                    every step in a row (a machine without the 10-minute command limit)
# --dry-run prints the commands a step would run, each with its budget, and runs nothing (GPU_CC=9.0 shows `first 6`
# as on an H100).
# --cpu-smoke runs the step on CPU with the benchmarks' --cpu-smoke flags (tests/benchmarks runs it).
#
# What cannot fail on set-up (the first GPU session lost a 270 s command to a hang and two files to names):
# - Import: if `moelink` already imports from this checkout, nothing is installed; in the first plan, else the
#   shim below (no pip at all, as in the CPU smoke runs); in the other steps, else, with pip and
#   setuptools >= 64 (PEP 660), `pip install --no-deps --no-build-isolation -e .`; if that is impossible
#   or fails, a shim package .gpu_session/pyshim/moelink (its __path__ is the repository root, which is
#   the layout pyproject maps: moelink.engine -> engine/, moelink.kernels -> kernels/, ...) is put first on
#   PYTHONPATH. Every step checks `import moelink.kernels.moe_config` before it starts.
# - Triton's cache is .gpu_session/triton_cache (git-ignored, inside the repository, so the device tool
#   keeps it between commands of one lease: only the first command pays the cold compiles).
# - pytest: one process per test file under `timeout`, so a hang loses one file, not the step; with
#   pytest-timeout, --timeout=$PER_TEST_TIMEOUT_S (thread method: a hang inside a C call, such as the NCCL
#   one of the first session, is still caught) and its stack dump; without it, pytest's own
#   faulthandler_timeout dumps the stacks and `timeout` ends the file. Plugins that are absent are not
#   asked for (-p no:cacheprovider only).
# - Files under $OUT: names of letters, digits, '.', '_' and '-' only (the device tool drops others), no
#   folders, at most 8 per step. Tuned configs, named `E=..,N=..,device_name=...json` (FP8:
#   `fp8_w8a8,E=..,N=..,device_name=...json`), travel in a tarball.
#
# Tuned configs: after `tune SHAPE` (or `tune-fp8 SHAPE`) on the device, the tarball comes back under the tool's
# files folder;
#   bash benchmarks/gpu_session.sh unpack path/to/tuned_configs_<GPU>_<SHAPE>.tar.gz
# (or: tar -xzf FILE -C kernels/configs) puts E=..,N=..,device_name=<GPU>.json in kernels/configs, where
# kernels/moe_config.py looks them up by device name (triton_moe_fp8.get_fp8_moe_config the fp8_w8a8 ones);
# commit them.
#
# Budgets (cold Triton cache; the device tool stops a command at 600 s, a lease holds 1800 s in all).
# A command's budget = START_S + GEMM compiles x S_PER_GEMM_COMPILE + slow compiles x S_PER_SLOW_COMPILE
# + other compiles x S_PER_COMPILE + run seconds, and it runs under `timeout` at that budget. Per-compile
# costs come from the cold compiles benchmarks/compile_report.py timed per kernel class (results/
# compile_report_sm90.json: Triton 3.6 as on the device, sm_90a, 148 kernels on an idle 2-core CPU machine):
#   GEMM (MoE up/down in any dtype, bf16/fp16 attention decode/prefill): mean 0.51 s, max 2.1 s -> 2 s
#   slow (fp32 attention decode/prefill: the fp32 dot lowers to FMA loops): mean 2.4 s, max 2.9 s -> 5 s
#   other (align, top-k sum, split merge, KV write, RMSNorm, rotary): mean 0.30 s, max 1.0 s -> 1 s
# i.e. at least twice the mean (a sum of many compiles on a CPU up to 2x slower) and, with LAUNCHER_S for
# the C launcher Triton 3.6 builds per new signature (measured 0.4 s with cc), at least the slowest one;
# tests/benchmarks/test_gpu_session.py holds the script to both against the committed report.
# Run seconds: the first session's timings (benchmarks/results/gpu_*_2026-11-22.md: all 40 GPU tests, cold
# compiles included, took under 270 s there) with margin. Every step's commands add up to at most
# STEP_BUDGET_S (600 s less 30 s for the tool's own start and transfers), and the first plan's commands to at
# most FIRST_BUDGET_S (benchmarks/gpu_session/first.sh: 2,400 s, a lease of 45 minutes less the tool's starts).
set -uo pipefail

STEP_BUDGET_S=570
START_S=20             # python + torch + CUDA context start, per process
LAUNCHER_S=1           # cc of one Triton launcher (Triton 3.6; cached per signature)
S_PER_GEMM_COMPILE=$((2 + LAUNCHER_S))
S_PER_SLOW_COMPILE=$((5 + LAUNCHER_S))
S_PER_COMPILE=$((1 + LAUNCHER_S))
PER_TEST_TIMEOUT_S=150
SHAPES=(qwen3-30b-a3b mixtral-8x7b deepseek-v3)
# moe SHAPE: run seconds per shape (7 token counts x 4 systems, eager + graph, 30 iterations; DeepSeek's
# 22 GB of weights and its per-expert loop at 16k tokens dominate) and (with --quick: 4 token counts).
declare -A MOE_RUN_S=([qwen3-30b-a3b]=120 [mixtral-8x7b]=150 [deepseek-v3]=240)
declare -A MOE_QUICK_RUN_S=([qwen3-30b-a3b]=70 [mixtral-8x7b]=90 [deepseek-v3]=150)
# moe-fp8 SHAPE: the FP8 checkpoints' shapes; 2 systems (bf16, fp8) x 7 token counts, eager + graph, plus
# quantizing the experts once and the fp8 reference check up to 1024 tokens (estimates: not yet run on a GPU).
FP8_SHAPES=(deepseek-v3 qwen3-30b-a3b)
declare -A MOE_FP8_RUN_S=([qwen3-30b-a3b]=100 [deepseek-v3]=200)
declare -A MOE_FP8_QUICK_RUN_S=([qwen3-30b-a3b]=60 [deepseek-v3]=120)
# tune SHAPE: the tuner's own --budget-s (it stops starting candidates then), plus one candidate that may
# start just before it (2 GEMM compiles and its timing) and the seed-vs-best confirmation of the last bucket.
TUNE_BUDGET_S=${TUNE_BUDGET_S:-400}   # (TUNE_BUDGET_S=200 bash ... tune SHAPE: a shorter search, same guarantees)
TUNE_TAIL_S=40

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
STATE=${GPU_SESSION_STATE:-$REPO/.gpu_session}  # (the tests point it elsewhere)
OUT_GIVEN=${OUT:+1}
OUT=${OUT:-benchmarks/results}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$STATE/triton_cache}

MODE=run
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) MODE=dry-run; shift ;;
    --cpu-smoke) MODE=cpu-smoke; shift ;;
    *) break ;;
  esac
done
STEP=${1:-}
[[ $# -gt 0 ]] && shift

PY=${PYTHON:-$(command -v python || command -v python3 || true)}  # PYTHON=/path/to/python picks another

say() { echo "[gpu_session] $*"; }

# -- names the device tool returns ------------------------------------------------------------------------------------
safe_name() { printf '%s' "$1" | tr -c 'A-Za-z0-9._-' '_'; }
device_label() {  # the GPU's name as moelink.kernels.moe_config.device_name writes it; "cpu" without one
  local d=""
  if [[ $MODE == run && -n "$PY" ]]; then
    d=$("$PY" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_') if torch.cuda.is_available() else 'cpu')" 2>/dev/null)
  fi
  [[ -z "$d" ]] && d=cpu
  safe_name "$d"
}

# -- budgeted commands ----------------------------------------------------------------------------------------------------
STEP_TOTAL=0
STATUS=0
# budget GEMM SLOW OTHER RUN_S: seconds for one process that compiles that many kernels of each class.
budget() { echo $((START_S + $1 * S_PER_GEMM_COMPILE + $2 * S_PER_SLOW_COMPILE + $3 * S_PER_COMPILE + $4)); }
plan_line() {  # NAME GEMM SLOW OTHER RUN_S BUDGET WHAT
  printf 'PLAN step=%s cmd=%s gemm_compiles=%s slow_compiles=%s other_compiles=%s run_s=%s budget_s=%s :: %s\n' \
    "$STEP" "$1" "$2" "$3" "$4" "$5" "$6" "$7"
}
# cmd NAME GEMM SLOW OTHER RUN_S -- COMMAND...: print it (dry-run) or run it under its budget.
cmd() {
  local name=$1 gemm=$2 slow=$3 other=$4 run_s=$5
  shift 6
  local est
  est=$(budget "$gemm" "$slow" "$other" "$run_s")
  STEP_TOTAL=$((STEP_TOTAL + est))
  plan_line "$name" "$gemm" "$slow" "$other" "$run_s" "$est" "$*"
  [[ $MODE == dry-run ]] && return 0
  local t0=$SECONDS rc=0
  if command -v timeout >/dev/null; then
    timeout -k 15 "$est" "$@" || rc=$?
  else
    "$@" || rc=$?
  fi
  say "$name: exit $rc after $((SECONDS - t0)) s (budget $est s)$([[ $rc == 124 || $rc == 137 ]] && echo ': STOPPED AT ITS BUDGET')"
  [[ $rc != 0 ]] && STATUS=1
  return 0
}
# plan_only NAME GEMM SLOW OTHER RUN_S WHAT: the budget line of work this shell does itself (no command to cap).
plan_only() {
  local est
  est=$(budget "$2" "$3" "$4" "$5")
  STEP_TOTAL=$((STEP_TOTAL + est))
  plan_line "$1" "$2" "$3" "$4" "$5" "$est" "$6"
}
finish_step() {
  if ((STEP_TOTAL > STEP_BUDGET_S)); then
    say "step $STEP: commands budgeted at $STEP_TOTAL s > $STEP_BUDGET_S s: split it" >&2
    [[ $MODE == dry-run ]] && STATUS=3
  fi
  echo "STEP step=$STEP total_budget_s=$STEP_TOTAL limit_s=$STEP_BUDGET_S"
}

# -- preflight --------------------------------------------------------------------------------------------------------
# check WHAT OK DETAIL [FALLBACK]: one line per check; FALLBACK is what happens when it is missing.
PF_LINES=()
check() {
  local what=$1 ok=$2 detail=$3 fallback=${4:-}
  local line
  if [[ $ok == 1 ]]; then line="ok      $what: $detail"; else line="MISSING $what: $detail${fallback:+ -> $fallback}"; fi
  PF_LINES+=("$line")
  echo "$line"
}
pymod_version() {  # version of an importable module, empty when it is absent
  [[ -n "$PY" ]] || return 0
  "$PY" - "$1" <<'EOF' 2>/dev/null
import importlib, importlib.metadata as md, sys
name = sys.argv[1]
try:
    m = importlib.import_module(name)
except Exception:
    sys.exit(0)
for dist in (name, name.replace("_", "-")):
    try:
        print(md.version(dist)); sys.exit(0)
    except Exception:
        pass
print(getattr(m, "__version__", "present"))
EOF
}

plugin_installed() {  # is the pytest plugin distribution $1 installed (what pytest loads plugins by: its metadata)?
  # No import of the plugin (and of pytest with it): ~0.05 s instead of ~0.2 s, once per pytest step's plan.
  [[ -n "$PY" ]] || return 1
  "$PY" -c "import importlib.metadata as md, sys; md.distribution(sys.argv[1])" "$1" 2>/dev/null
}

torch_info() {  # torch's version, then its CUDA device (or why none), from one Python start: empty without torch
  [[ -n "$PY" ]] || return 0
  "$PY" - <<'EOF' 2>/dev/null
import importlib.metadata as md, sys
try:
    import torch
except Exception:
    sys.exit(0)
try:
    print(md.version("torch"), flush=True)
except Exception:
    print(getattr(torch, "__version__", "present"), flush=True)
print("CUDA " + str(torch.version.cuda) + ", " + torch.cuda.get_device_name() if torch.cuda.is_available()
      else "no CUDA device (CPU build or no GPU)")
EOF
}

IMPORT_MODE=""
moelink_here() {  # does `import moelink.kernels` resolve to this checkout (with the current PYTHONPATH)?
  [[ -n "$PY" ]] || return 1
  local f
  f=$("$PY" -c "import moelink.kernels.moe_config as m; print(m.__file__)" 2>/dev/null) || return 1
  [[ "$f" == "$REPO/"* ]]
}
make_shim() {  # (written beside, then renamed: a Python of another step never reads it half-written)
  mkdir -p "$STATE/pyshim/moelink"
  cat >"$STATE/pyshim/moelink/__init__.py.$$" <<EOF
# Written by benchmarks/gpu_session.sh: import moelink from the source tree (pyproject maps each root
# folder to moelink.<folder>), for when the editable install is impossible.
__path__ = ["$REPO"]
EOF
  mv -f "$STATE/pyshim/moelink/__init__.py.$$" "$STATE/pyshim/moelink/__init__.py"
}
use_shim() {
  make_shim
  export PYTHONPATH="$STATE/pyshim${PYTHONPATH:+:$PYTHONPATH}"
}
decide_import() {  # sets IMPORT_MODE: installed | editable | shim ; APPLY=1 does it
  local apply=$1
  if moelink_here; then IMPORT_MODE=installed; return 0; fi
  local st
  st=$(pymod_version setuptools)
  if [[ -n "$PY" ]] && "$PY" -m pip --version >/dev/null 2>&1 && [[ -n "$st" ]] \
     && "$PY" -c "import sys, setuptools; sys.exit(int(setuptools.__version__.split('.')[0]) < 64)" 2>/dev/null; then
    IMPORT_MODE=editable
    if [[ $apply == 1 ]]; then
      if timeout 180 "$PY" -m pip install --no-deps --no-build-isolation -e . >"$STATE/pip_install.log" 2>&1 && moelink_here; then
        return 0
      fi
      say "editable install failed (see .gpu_session/pip_install.log): using the PYTHONPATH shim"
    else
      return 0
    fi
  fi
  IMPORT_MODE=shim
  [[ $apply == 1 ]] && use_shim
  return 0
}

HAVE_PYTEST_TIMEOUT=0
preflight() {  # prints the checks; returns 0 always (it reports, the steps fall back)
  local apply=${1:-0}
  mkdir -p "$STATE" "$TRITON_CACHE_DIR"
  check python "$([[ -n $PY ]] && echo 1 || echo 0)" "${PY:-none} $([[ -n $PY ]] && "$PY" -c 'import sys; print(sys.version.split()[0])')" \
    "nothing can run"
  local v
  local tinfo cuda="no CUDA device"
  tinfo=$(torch_info)
  v=$(sed -n 1p <<<"$tinfo")
  [[ -n "$v" ]] && cuda=$(sed -n 2p <<<"$tinfo")
  check torch "$([[ -n $v ]] && echo 1 || echo 0)" "${v:-absent}; $cuda" "no step can run"
  v=$(pymod_version triton)
  check triton "$([[ -n $v ]] && echo 1 || echo 0)" "${v:-absent}" "GPU kernels fall back to the torch reference (tests of them fail)"
  local nv ptxas
  nv=$("$PY" -c "from triton.backends.nvidia.compiler import CUDABackend; print('yes')" 2>/dev/null)
  ptxas=$("$PY" -c "import triton, os; p = os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/ptxas'); print(p if os.access(p, os.X_OK) else '')" 2>/dev/null)
  check "triton NVIDIA backend + ptxas" "$([[ $nv == yes && -n $ptxas ]] && echo 1 || echo 0)" "${ptxas:-no ptxas}" \
    "compile-report cannot run; Triton on a GPU needs ptxas too"
  local cc
  cc=${CC:-$(command -v cc || command -v gcc || command -v clang || true)}
  check "C compiler (Triton's launcher)" "$([[ -n $cc ]] && echo 1 || echo 0)" "${cc:-none}" \
    "Triton cannot build its launcher: only launchers already in $TRITON_CACHE_DIR work"
  local pyh
  pyh=$("$PY" -c "import sysconfig, os; p = os.path.join(sysconfig.get_paths()['include'], 'Python.h'); print(p if os.path.exists(p) else '')" 2>/dev/null)
  check "Python.h (Triton's launcher)" "$([[ -n $pyh ]] && echo 1 || echo 0)" "${pyh:-absent}" \
    "Triton cannot build its launcher: only launchers already in $TRITON_CACHE_DIR work"
  v=$(pymod_version pytest)
  check pytest "$([[ -n $v ]] && echo 1 || echo 0)" "${v:-absent}" "the tests steps are skipped"
  v=$(pymod_version pytest_timeout)
  if [[ -n "$v" ]]; then HAVE_PYTEST_TIMEOUT=1; fi
  check pytest-timeout "$HAVE_PYTEST_TIMEOUT" "${v:-absent}; per test ${PER_TEST_TIMEOUT_S} s" \
    "pytest -o faulthandler_timeout dumps a hung test's stacks and \`timeout\` ends its file"
  v=$(pymod_version transformers)
  check transformers "$([[ -n $v ]] && echo 1 || echo 0)" "${v:-absent}" "tests that compare with transformers skip or fail"
  local pipv st
  pipv=$("$PY" -m pip --version 2>/dev/null | awk '{print $2}')
  st=$(pymod_version setuptools)
  check "pip + setuptools (editable install)" "$([[ -n $pipv && -n $st ]] && echo 1 || echo 0)" \
    "pip ${pipv:-absent}, setuptools ${st:-absent}" "PYTHONPATH shim .gpu_session/pyshim"
  check "timeout (coreutils)" "$(command -v timeout >/dev/null && echo 1 || echo 0)" "$(command -v timeout || echo absent)" \
    "commands run without their budget cap"
  check "nvidia-smi" "$(command -v nvidia-smi >/dev/null && echo 1 || echo 0)" "$(command -v nvidia-smi || echo absent)" \
    "no clocks/power record"
  decide_import "$apply"
  local what
  case $IMPORT_MODE in
    installed) what="moelink already imports from $REPO: nothing to install" ;;
    editable) what="pip install --no-deps --no-build-isolation -e . (the shim if that fails)" ;;
    shim) what="PYTHONPATH=$STATE/pyshim (moelink.<folder> -> <folder>/ of this checkout)" ;;
  esac
  echo "plan    import: $what"
  echo "plan    Triton cache: $TRITON_CACHE_DIR ($(find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l) entries)"
  echo "plan    output: $OUT (names [A-Za-z0-9._-], no folders, <= 8 files per step)"
  return 0
}

setup() {  # [first]: what every step but preflight/plan/unpack needs: the import working, the cache in place
  mkdir -p "$OUT" "$STATE" "$TRITON_CACHE_DIR"
  if [[ $MODE == cpu-smoke ]]; then
    use_shim  # never install into this machine's environment from a smoke run
    IMPORT_MODE=shim
  elif [[ $MODE == run && ${1:-} == first ]]; then  # no pip in the first plan: what the CPU smoke runs test
    if moelink_here; then IMPORT_MODE=installed; else use_shim; IMPORT_MODE=shim; fi
  elif [[ $MODE == run ]]; then
    decide_import 1 >"$STATE/import.txt" 2>&1  # (the full checks are the preflight step's: ~12 Python starts)
  fi
  if [[ $MODE != dry-run ]] && ! "$PY" -c "import moelink.kernels.moe_config" 2>/dev/null; then
    say "cannot import moelink.kernels.moe_config (import mode: $IMPORT_MODE); run the preflight step" >&2
    exit 2
  fi
  [[ $MODE == run ]] && say "import: $IMPORT_MODE; Triton cache: $TRITON_CACHE_DIR"
  return 0
}

# -- steps -----------------------------------------------------------------------------------------------------------------
pytest_args() {
  local a=(-v -rfEs -p no:cacheprovider --durations=15 -o "faulthandler_timeout=$((PER_TEST_TIMEOUT_S - 10))")
  if [[ $HAVE_PYTEST_TIMEOUT == 1 ]] || plugin_installed pytest-timeout; then
    a+=(--timeout="$PER_TEST_TIMEOUT_S" --timeout-method=thread)
  else
    a+=(-o timeout=0)  # pyproject's `timeout` ini key means nothing without the plugin
  fi
  printf '%s\n' "${a[@]}"
}
run_pytest_files() {  # LOG_NAME then (NAME GEMM SLOW OTHER RUN_S FILE)...: one pytest process per file (FILE: a
  # file, or several node ids of one file separated by whitespace)
  local log=$1
  shift
  local args
  mapfile -t args < <(pytest_args)
  [[ $MODE != dry-run ]] && : >"$OUT/$log"
  while [[ $# -gt 0 ]]; do
    local name=$1 gemm=$2 slow=$3 other=$4 run_s=$5 file=$6 targets=()
    shift 6
    IFS=$' \t\n' read -r -d '' -a targets <<<"$file" || true
    if [[ $MODE == dry-run ]]; then
      cmd "$name" "$gemm" "$slow" "$other" "$run_s" -- "$PY" -m pytest "${args[@]}" -m gpu "${targets[@]}"
    else
      echo "=== ${targets[*]}" >>"$OUT/$log"
      cmd "$name" "$gemm" "$slow" "$other" "$run_s" -- \
        bash -c '"$@" >>"'"$OUT/$log"'" 2>&1' _ "$PY" -m pytest "${args[@]}" -m gpu "${targets[@]}"
    fi
  done
  [[ $MODE != dry-run ]] && tail -n 3 "$OUT/$log"
  return 0
}
# Compile counts: distinct Triton specialisations a file launches on a cold cache, counted from its cases.
#  test_triton_gpu.py (27 tests):
#    GEMM 37: fused MoE 9 shape x T cases (one tuned config each: 9 up + 9 down) + 4 variants (atomic down,
#      fp32 and fp16 up+down, EP map: 7) = 25; attention bf16, 2 head layouts x (decode split/no split,
#      prefill plain/split/skip-decode) = 10; the int32-offset case 2.
#    slow 10: the same attention cases in fp32 (2 layouts x (2 decode + 3 prefill)).
#    other 57: align 2 per MoE case and 2 per align test (34), top-k sum 6, merge 4, decode split plan 2
#      (BLOCK_N 64 and fp32's 32), KV write 4, norm and rotary 3 x 2 + 1.
#  test_mla.py -m gpu (3 tests, DeepSeek-V3 shapes, bf16): GEMM 2 (the MLA kernel unsplit and split; its
#    dots are attention-class), other 3 (decode split plan, its merge, latent write); run: float64 references
#    on the GPU.
#  test_sampler_seeds.py + test_all_to_all_local.py: 1 + 2 tests, no Triton kernels (torch sampling, NCCL).
#  test_gpu_engine.py (11 tests): 4 tiny models x fp32/bf16, decode (BLOCK_M 16) and prefill (32) buckets ->
#    GEMM 44 (MoE up/down 32, bf16 attention 12), slow 12 (fp32 attention), other 80 (align variants, sum,
#    merge, KV write, norms, rotary, ~10 per model and dtype); run: each test builds a tiny checkpoint and
#    runs transformers on CPU beside the engine.
step_tests_kernels() {
  run_pytest_files "gpu_tests_kernels_${DEV}.txt" \
    triton_gpu 37 10 57 90 tests/kernels/test_triton_gpu.py \
    mla 2 0 3 30 tests/kernels/test_mla.py \
    sampler_seeds 0 0 0 20 tests/engine/test_sampler_seeds.py \
    comm 0 0 0 40 tests/comm/test_all_to_all_local.py
}
#  test_triton_fp8_gpu.py (19 tests): fused MoE at 2 shapes x 3 T x sum/atomic -> the FP8 default buckets hit
#    (5 shape x bucket pairs: up + down + atomic down = 15) + the dense GEMM 3 = GEMM 18; other 20 (align,
#    top-k sum, group quant per shape) + 8 (the FP8 tiny GEMVs, 4 tests: up and down per shape and map, the fp32 h
#    quantization) + 6 (issue 80's two-launch form at T 1: the quantizing norm per shape, the gate-up GEMV with h
#    apart, h's group quantization); run: float32 references on the GPU, DeepSeek's 32 local experts (+35 s: the
#    tiny tests' experts and a CUDA graph each, the two-launch form's graph replayed twice, estimated).
#  test_triton_moe_mxfp4_gpu.py (10 tests, 1 skipped below sm_100): gpt-oss-120b experts at 5 T x variant ->
#    GEMM 10 (up + down per case), other 10 (align, sum); the decode/prefill paths (4 tests): GEMM 4 (the dequant
#    path's float up + down at 2 buckets), other 10 (2 x 2 tiny GEMVs, the pre-pass, align, sum); run: float32
#    references on the GPU (measured 12 s for the first 5; the 4096-token oracle and pre-pass: +20 s estimated).
#  test_triton_moe_nvfp4_gpu.py (4 tests): Qwen3-30B-A3B experts at 4 T x variant -> GEMM 8 (up + down per case),
#    other 8 (align, sum); run: float32 references on the GPU (estimate, as the MXFP4 file's).
#  test_mla_fp8_prefill.py -m gpu (1 test, DeepSeek-V3 shapes over an fp8 latent cache): GEMM 2 (the MLA kernel
#    over the fp8 cache for the decodes, over the widened workspace for the chunks), other 2 (the fp8 latent
#    write, the widen kernel); run: a float64 reference on the GPU (estimate).
step_tests_fp8() {
  run_pytest_files "gpu_tests_fp8_${DEV}.txt" \
    triton_fp8_gpu 18 0 34 95 tests/kernels/test_triton_fp8_gpu.py \
    triton_mxfp4_gpu 14 0 20 70 tests/kernels/test_triton_moe_mxfp4_gpu.py \
    triton_nvfp4_gpu 8 0 8 40 tests/kernels/test_triton_moe_nvfp4_gpu.py \
    mla_fp8_gpu 2 0 2 30 tests/kernels/test_mla_fp8_prefill.py
}
step_tests_engine() {
  run_pytest_files "gpu_tests_engine_${DEV}.txt" \
    gpu_engine 44 12 80 120 tests/engine/test_gpu_engine.py
}

check_shape() {
  local s
  for s in "${SHAPES[@]}"; do [[ $1 == "$s" ]] && return 0; done
  echo "SHAPE must be one of ${SHAPES[*]} (got '${1:-}')" >&2
  exit 2
}
# moe SHAPE: per token count one config -> up + down (sum) + down (atomic) GEMMs, 2 align kernels and the sum;
# the tiny-batch system (moelink-triton-tiny, <= 512 pairs) adds its two GEMVs once (the pair count is not
# specialised on): 7 token counts -> 21 GEMM + 17 other compiles (--quick: 4 -> 12 + 11).
step_moe() {
  local shape="" quick=0 a
  for a in "$@"; do case "$a" in --quick) quick=1 ;; *) shape=$a ;; esac; done
  if [[ $MODE == cpu-smoke ]]; then
    cmd moe_kernels 0 0 0 120 -- "$PY" -m moelink.benchmarks.moe_kernels --cpu-smoke --out "$OUT/moe_kernels_cpu_smoke.json"
    return 0
  fi
  check_shape "$shape"
  local toks=() n=7 run=${MOE_RUN_S[$shape]}
  if [[ $quick == 1 ]]; then toks=(--tokens 1,64,1024,16384); n=4; run=${MOE_QUICK_RUN_S[$shape]}; fi
  cmd "moe_kernels_$shape" $((3 * n)) 0 $((2 * n + 3)) "$run" -- \
    "$PY" -m moelink.benchmarks.moe_kernels --shapes "$shape" "${toks[@]}" --out "$OUT/moe_kernels_${DEV}_${shape}.json"
}

# moe-fp8 SHAPE: per token count the bf16 config (up + down) and the FP8 one (up + down): 4 GEMM; 2 align per
# config, the top-k sum twice and the group quantization: 7 other (7 token counts -> 28 + 49; --quick: 4 -> 16 + 28).
check_fp8_shape() {
  local s
  for s in "${FP8_SHAPES[@]}"; do [[ $1 == "$s" ]] && return 0; done
  echo "SHAPE must be one of ${FP8_SHAPES[*]} (got '${1:-}')" >&2
  exit 2
}
step_moe_fp8() {
  local shape="" quick=0 a
  for a in "$@"; do case "$a" in --quick) quick=1 ;; *) shape=$a ;; esac; done
  if [[ $MODE == cpu-smoke ]]; then
    cmd moe_kernels_fp8 0 0 0 240 -- "$PY" -m moelink.benchmarks.moe_kernels --cpu-smoke --dtype fp8 \
      --out "$OUT/moe_kernels_cpu_smoke_fp8.json"
    return 0
  fi
  check_fp8_shape "$shape"
  local toks=() n=7 run=${MOE_FP8_RUN_S[$shape]}
  if [[ $quick == 1 ]]; then toks=(--tokens 1,64,1024,16384); n=4; run=${MOE_FP8_QUICK_RUN_S[$shape]}; fi
  cmd "moe_kernels_fp8_$shape" $((4 * n)) 0 $((7 * n)) "$run" -- \
    "$PY" -m moelink.benchmarks.moe_kernels --dtype fp8 --shapes "$shape" "${toks[@]}" \
    --out "$OUT/moe_kernels_${DEV}_${shape}_fp8.json"
}

# moe-nvfp4 [--quick]: Qwen3-30B-A3B and DeepSeek-V3 experts, NVFP4 vs bf16 (moe_nvfp4.py): per shape and token
# count 2 systems x (up + down) = 4 GEMM and 3 other (2 align + sum); 6 token counts x 2 shapes -> 48 GEMM + 36
# other (--quick: 1,64,1024 -> 24 + 18). Run: estimate (DeepSeek-V3's 256 experts: 6.3 GB NVFP4 + 22 GB bf16).
step_moe_nvfp4() {
  if [[ $MODE == cpu-smoke ]]; then
    cmd moe_nvfp4 0 0 0 120 -- "$PY" -m moelink.benchmarks.moe_nvfp4 --cpu-smoke --out "$OUT/moe_nvfp4_cpu_smoke.json"
    return 0
  fi
  local toks=() n=6
  if [[ "${1:-}" == "--quick" ]]; then toks=(--tokens 1,64,1024); n=3; fi
  cmd moe_nvfp4 $((8 * n)) 0 $((6 * n)) 150 -- \
    "$PY" -m moelink.benchmarks.moe_nvfp4 "${toks[@]}" --out "$OUT/moe_nvfp4_${DEV}.json"
}

# moe-mxfp4 [--quick]: gpt-oss-120b and -20b experts, MXFP4 paths vs bf16 (moe_mxfp4.py): per token count the
# per-tile and bf16 GEMMs (4; the dequant path reuses bf16's float GEMMs, and both shapes have D = I = 2880, so
# the second shape compiles nothing new but the E-dependent align), and others: align + sum, the two tiny GEMVs,
# the pre-pass; 7 token counts -> 4*7 + 2 (auto path) = 30 GEMM, 30 other, doubled for margin: 60 + 60 (--quick:
# 1,64,1024 -> 28 + 28). Run: 40 s measured for 2 systems x 6 counts (2026-11-22); now ~5 systems and 16384
# tokens: 160 s.
step_moe_mxfp4() {
  if [[ $MODE == cpu-smoke ]]; then
    cmd moe_mxfp4 0 0 0 120 -- "$PY" -m moelink.benchmarks.moe_mxfp4 --cpu-smoke --out "$OUT/moe_mxfp4_cpu_smoke.json"
    return 0
  fi
  local toks=() n=7
  if [[ "${1:-}" == "--quick" ]]; then toks=(--tokens 1,64,1024); n=3; fi
  cmd moe_mxfp4 $((60 * n / 7)) 0 $((60 * n / 7)) 160 -- \
    "$PY" -m moelink.benchmarks.moe_mxfp4 "${toks[@]}" --out "$OUT/moe_mxfp4_${DEV}.json"
}

# tune SHAPE [TOKENS]: the tuner stops starting candidates at --budget-s; compile counts are what fits in it
# (each candidate is at most 2 GEMM compiles): the estimate is the budget, not a count. The search (tune_moe's
# default quick space, benchmarks/tune_space.py) includes the persistent tile loop (PERSISTENT) and the TMA loads
# (TMA) of each GEMM, which the shipped configs leave off until this step measures them.
tune_run() {  # KIND (bf16 | fp8 | mxfp4 | invariant) SHAPE [TOKENS]: the tune steps differ only in these names
  local kind=$1 shape=${2:-} tokens=${3:-}
  local sfx="" dtype=() smoke=smoke-e8 prefix="" label=tune check=check_shape module=tune_moe
  case $kind in
    fp8) sfx=_fp8 dtype=(--dtype fp8) smoke=smoke-fp8-e8 prefix=fp8_w8a8, label=tune-fp8 check=check_fp8_shape ;;
    mxfp4) sfx=_mxfp4 dtype=(--dtype mxfp4) smoke=smoke-mxfp4 prefix=mxfp4, label=tune-mxfp4 check=check_mxfp4_shape ;;
    invariant) sfx=_invariant module=tune_moe_invariant prefix=batch_invariant, label=tune-invariant
      [[ $MODE == cpu-smoke ]] || dtype+=(--weights "$INVARIANT_TUNE_WEIGHTS") ;;
  esac
  local stage="$STATE/tuned$sfx"
  rm -rf "$stage"
  mkdir -p "$stage"
  if [[ $MODE == cpu-smoke ]]; then
    # One smoke shape and bucket: this checks the step's plumbing (stage, tarball, unpack); the tuner's smoke run
    # itself is tests/benchmarks/test_gpu_benchmark_smoke.py's.
    cmd "tune_moe$sfx" 0 0 0 180 -- "$PY" -m "moelink.benchmarks.$module" --cpu-smoke "${dtype[@]}" --shapes "$smoke" \
      --tokens 1 --out-dir "$stage"
    shape=smoke
  else
    "$check" "$shape"
    local args=(-m "moelink.benchmarks.$module" "${dtype[@]}" --shapes "$shape" ${tokens:+--tokens "$tokens"}
                --budget-s "$TUNE_BUDGET_S" --out-dir "$stage")
    if [[ $MODE == dry-run ]]; then
      cmd "tune_moe${sfx}_$shape" 0 0 0 $((TUNE_BUDGET_S + TUNE_TAIL_S)) -- "$PY" "${args[@]}"
    else  # its log is also a file: the device tool returns only the tail of a command's output
      cmd "tune_moe${sfx}_$shape" 0 0 0 $((TUNE_BUDGET_S + TUNE_TAIL_S)) -- \
        bash -c 'set -o pipefail; "$@" 2>&1 | tee "'"$OUT/tune_moe${sfx}_${DEV}_${shape}.txt"'"' _ "$PY" "${args[@]}"
    fi
  fi
  [[ $MODE == dry-run ]] && return 0
  local tarball="$OUT/tuned_configs${sfx}_${DEV}_${shape}.tar.gz"
  if compgen -G "$stage/${prefix}E=*.json" >/dev/null; then
    tar -czf "$tarball" -C "$stage" $(cd "$stage" && ls "${prefix}"E=*.json)
    say "tuned configs in $tarball ($(tar -tzf "$tarball" | tr '\n' ' ')): bash benchmarks/gpu_session.sh unpack $(basename "$tarball")"
  else
    say "$label $shape wrote no config"
    STATUS=1
  fi
}
step_tune() { tune_run bf16 "$@"; }

# tune-fp8 SHAPE [TOKENS]: tune_moe --dtype fp8 (benchmarks/tune_moe_fp8.py), budgeted as tune: the tuner's --budget-s
# holds all it does in a bucket (the weights quantized once per shape, the float reference, the bf16 fused MoE timed
# first for the RATIO line, the search), TUNE_TAIL_S the candidate started just before it and the confirmation.
step_tune_fp8() { tune_run fp8 "$@"; }

# tune-mxfp4 SHAPE [TOKENS]: tune_moe --dtype mxfp4 (benchmarks/tune_moe_mxfp4.py), budgeted as tune: the tuner's
# --budget-s covers the MXFP4 layer's draw, the bf16 comparison on its dequantized weights and every candidate's
# compiles, then TUNE_TAIL_S (one candidate started just before the budget, the last bucket's confirmation). TOKENS
# defaults to 1024,4096: the buckets where per-tile and dequantize-once are close (round3 4 times them; the decode
# buckets run the GEMVs whatever the rest says), each bucket getting half the budget; a new file keeps the other
# buckets at the configs used until then. Its tarball unpacks (`unpack`) into kernels/configs, where
# triton_moe_mxfp4's config table reads `mxfp4,E=..,N=..,device_name=..json` before mxfp4_moe_default.json.
MXFP4_SHAPES=(gpt-oss-20b gpt-oss-120b)
MXFP4_TUNE_TOKENS=1024,4096
check_mxfp4_shape() {
  local s
  for s in "${MXFP4_SHAPES[@]}"; do [[ $1 == "$s" ]] && return 0; done
  echo "SHAPE must be one of ${MXFP4_SHAPES[*]} (got '${1:-}')" >&2
  exit 2
}
step_tune_mxfp4() { tune_run mxfp4 "${1:-}" "${2:-$MXFP4_TUNE_TOKENS}"; }

# tune-invariant SHAPE: benchmarks/tune_moe_invariant.py, budgeted as tune: the one config
# the batch-invariant mode's experts run at every count, timed over round3 3's workload (32 prompts of 64 in, 32 out:
# one 2,048-token prefill step and 31 decode steps of 32: tokens 32,2048 weighted 31,1), with a RATIO line per count
# against the normal engine's experts. Its tarball unpacks into kernels/configs, where the mode reads
# `batch_invariant,E=..,N=..,device_name=..json` for that shape on that GPU. After `round3 3` says the gap is the
# experts' (gap_family_us).
INVARIANT_TUNE_TOKENS=32,2048
INVARIANT_TUNE_WEIGHTS=31,1
step_tune_invariant() { tune_run invariant "${1:-}" "$INVARIANT_TUNE_TOKENS"; }

# decode: Qwen3-30B-A3B-shaped engine with random weights, 40 layers: its kernels (attention, norm, rotary,
# MoE at each batch's bucket) compile once: ~10 GEMM + 20 other; run: batches x (eager + graph capture).
# --model deepseek-v2-lite: MLA (its decode kernel and merge, the latent write), a dense first layer, shared
# experts: ~12 GEMM + 24 other; all 27 layers fit.
step_decode() {
  local quick=0 model=qwen3-30b-a3b suffix="" prev="" a
  for a in "$@"; do
    if [[ $prev == --model ]]; then model=$a; prev=""; continue; fi
    case "$a" in
      --quick) quick=1 ;;
      --model) prev=--model ;;
      *) echo "decode: unknown argument '$a' (--quick, --model qwen3-30b-a3b|deepseek-v2-lite)" >&2; exit 2 ;;
    esac
  done
  case "$model" in
    qwen3-30b-a3b) ;;
    deepseek-v2-lite) suffix=_$model ;;
    *) echo "decode: --model must be qwen3-30b-a3b or deepseek-v2-lite (got '$model')" >&2; exit 2 ;;
  esac
  if [[ $MODE == cpu-smoke ]]; then
    cmd engine_decode 0 0 0 180 -- "$PY" -m moelink.benchmarks.engine_decode --cpu-smoke --model "$model" \
      --out "$OUT/engine_decode_${DEV}${suffix}.json"
    return 0
  fi
  local batches=() run=300 slow=0
  if [[ $quick == 1 ]]; then batches=(--batches 1,64,256); run=200; fi
  # DeepSeek-V2-Lite's dense layer and shared experts: the dense MLP's gate-up GEMV, a slow compile (compile_report_text)
  [[ $model == deepseek-v2-lite ]] && slow=1
  cmd engine_decode 12 "$slow" 24 "$run" -- "$PY" -m moelink.benchmarks.engine_decode --model "$model" --graphs \
    "${batches[@]}" --out "$OUT/engine_decode_${DEV}${suffix}.json"
}

# e2e [--quick] [--model M] [--dtype bf16|fp8] [--serve]: benchmarks/engine_e2e.py. Each command starts one LLM per
# step loop (async scheduling on, off: dummy weights, KV cache, decode graphs), times the graph-only step at
# batch 1/64/256 and LLM.generate on three workloads; the serving part starts `moelink serve` once. Compiles: the
# decode graphs' buckets (attention, MoE up/down per bucket) and the prefill/mixed steps' MoE buckets, shared by
# both loops through the Triton cache: ~36 GEMM + 48 other (the serving part alone ~24 + 36). Run: estimates
# (not yet run on a GPU): engine start ~90 s each, generate ~90 s per loop (quick: ~45), serving ~200 s. The
# benchmark stops starting points --time-budget-s into the command and saves its JSON after every point.
# The serving part (--quick, --serve, the CPU smoke) first checks what `moelink serve` imports (carry.sh: the
# GPU image lacks smg-grpc-proto, grpcio-health-checking and -reflection; the carried wheels are installed then):
# without them --quick runs without serving and says SKIPPED, --serve runs nothing and fails.
E2E_MODELS=(qwen3-30b-a3b deepseek-v2-lite)
step_e2e() {
  local quick=0 serve=0 model=qwen3-30b-a3b dtype=bf16 prev="" a m ok=0
  for a in "$@"; do
    if [[ $prev == --model ]]; then model=$a; prev=""; continue; fi
    if [[ $prev == --dtype ]]; then dtype=$a; prev=""; continue; fi
    case "$a" in
      --quick) quick=1 ;;
      --serve) serve=1 ;;
      --model|--dtype) prev=$a ;;
      *) echo "e2e: unknown argument '$a' (--quick, --serve, --model M, --dtype bf16|fp8)" >&2; exit 2 ;;
    esac
  done
  for m in "${E2E_MODELS[@]}"; do [[ $model == "$m" ]] && ok=1; done
  [[ $ok == 1 ]] || { echo "e2e: --model must be one of ${E2E_MODELS[*]} (got '$model')" >&2; exit 2; }
  [[ $dtype == bf16 || $dtype == fp8 ]] || { echo "e2e: --dtype must be bf16 or fp8 (got '$dtype')" >&2; exit 2; }
  local no_serve=()
  if [[ $quick == 1 || $serve == 1 || $MODE == cpu-smoke ]]; then
    serve_deps
    if [[ $SERVE_OK == 0 ]]; then
      if [[ $serve == 1 && $MODE != cpu-smoke ]]; then
        echo "SKIPPED e2e --serve: \`moelink serve\` cannot import here: $SERVE_WHY"
        STATUS=1
        return 0
      fi
      echo "SKIPPED the gRPC serving part: \`moelink serve\` cannot import here: $SERVE_WHY"
      no_serve=(--no-serve)
    fi
  fi
  if [[ $MODE == cpu-smoke ]]; then
    cmd engine_e2e 0 0 0 120 -- "$PY" -m moelink.benchmarks.engine_e2e --cpu-smoke "${no_serve[@]}" --out "$OUT/engine_e2e_${DEV}.json"
    return 0
  fi
  local name args=() out gemm=36 other=48 run
  if [[ $quick == 1 ]]; then  # (run 300 s: with the serving check's 30 s, 554 s as before it)
    name=engine_e2e_quick run=300 args=(--quick "${no_serve[@]}" --models "$model") out="engine_e2e_${DEV}_quick.json"
  elif [[ $serve == 1 ]]; then
    name="engine_e2e_serve_$model" gemm=24 other=36 run=260 args=(--serve-only --models "$model" --dtypes "$dtype")
    out="engine_e2e_${DEV}_${model}_${dtype}_serve.json"
  else
    name="engine_e2e_${model}_$dtype" run=340 args=(--no-serve --models "$model" --dtypes "$dtype")
    out="engine_e2e_${DEV}_${model}_${dtype}.json"
  fi
  # The benchmark starts no point in the last 120 s of the command's budget (a point then runs out its own).
  cmd "$name" "$gemm" 0 "$other" "$run" -- "$PY" -m moelink.benchmarks.engine_e2e "${args[@]}" \
    --time-budget-s $(( $(budget "$gemm" 0 "$other" "$run") - 120 )) --out "$OUT/$out"
}

# spec [--model M]: benchmarks/spec_decode.py on a full-size shape with random weights (issue 29's goal: >= 1.8x
# decode tokens/s at batch 1-16, p = 0.8, k = 2). Per batch (1, 4, 16): plain decoding in both loops, then the
# oracle drafter at p = 0 and 0.8 (verify steps of 3 tokens per row: the verify graphs beside the decode graphs).
# Compiles: the decode and verify graphs' buckets (attention, MoE up/down) ~24 GEMM + 36 other; run: four engine
# starts per batch ~60 s each with graphs (estimate, not yet run on a GPU). --quick: batch 4, p 0.8, one timed run:
# three engine starts (plain in both loops, then the drafter), 240 s; the same compile counts (the decode and
# verify buckets up to 4 x 3 tokens are fewer, counted as the full step's). spec_decode writes its JSON after
# every batch.
step_spec() {
  local model=qwen3-30b-a3b prev="" a quick=0
  for a in "$@"; do
    if [[ $prev == --model ]]; then model=$a; prev=""; continue; fi
    case "$a" in
      --model) prev=--model ;;
      --quick) quick=1 ;;
      *) echo "spec: unknown argument '$a' (--quick, --model qwen3-30b-a3b|deepseek-v2-lite)" >&2; exit 2 ;;
    esac
  done
  [[ $model == qwen3-30b-a3b || $model == deepseek-v2-lite ]] \
    || { echo "spec: --model must be qwen3-30b-a3b or deepseek-v2-lite (got '$model')" >&2; exit 2; }
  if [[ $MODE == cpu-smoke ]]; then
    cmd spec_decode 0 0 0 180 -- "$PY" -m moelink.benchmarks.spec_decode --batch 1 --p 0.8 --tokens 8 \
      --repeats 1 --out "$OUT/spec_decode_${DEV}.json"
    return 0
  fi
  if [[ $quick == 1 ]]; then
    cmd "spec_decode_${model}_quick" 24 0 36 240 -- "$PY" -m moelink.benchmarks.spec_decode --shape "$model" \
      --batch 4 --p 0.8 --k 2 --tokens 64 --repeats 1 --out "$OUT/spec_decode_${DEV}_${model}_quick.json"
    return 0
  fi
  cmd "spec_decode_$model" 24 0 36 400 -- "$PY" -m moelink.benchmarks.spec_decode --shape "$model" \
    --batch 1 4 16 --p 0 0.8 --k 2 --tokens 64 --repeats 2 --out "$OUT/spec_decode_${DEV}_${model}.json"
}

# mla-fp8-kv [--quick]: benchmarks/mla_fp8_kv.py, two commands (GPU only: the benchmark refuses a machine without
# CUDA; --cpu-smoke runs its toy shapes). Kernel part: V2-Lite's MLA over a bf16 and an fp8 cache; compiles: the
# bf16 kernel unsplit and as a planned decode split, the fp8 launches over the cache (decodes, SELECT) and over
# the widened workspace (SELECT), the fp8 planned decode split -> 5 GEMM (attention-class); the decode plan, its
# merge and the widen kernel -> 3 other; run: 4 cases x 2 caches x 23 calls, the 7,680-token prompt the longest
# (estimate, not yet run on a GPU). End-to-end part: two engines (bf16 KV, then fp8 KV) on V2-Lite's config at 12
# layers with random weights: its decode graphs and prefill/mixed buckets as the e2e step's (~36 GEMM + 48
# other, shared through the Triton cache; the fp8 attention launches add a few); run: engine start ~90 s each
# (estimate), generate 15.6 s (bf16) and 29.4 s (fp8, before the fix) measured for the full workload.
step_mla_fp8_kv() {
  local quick=() a
  for a in "$@"; do
    case "$a" in
      --quick) quick=(--quick) ;;
      *) echo "mla-fp8-kv: unknown argument '$a' (--quick)" >&2; exit 2 ;;
    esac
  done
  if [[ $MODE == cpu-smoke ]]; then
    cmd mla_fp8_kv 0 0 0 150 -- "$PY" -m moelink.benchmarks.mla_fp8_kv --cpu-smoke --out "$OUT/mla_fp8_kv_cpu_smoke.json"
    return 0
  fi
  local run=250 tag=""
  if [[ ${#quick[@]} -gt 0 ]]; then run=190; tag=_quick; fi
  cmd mla_fp8_kv_kernel 5 0 3 40 -- "$PY" -m moelink.benchmarks.mla_fp8_kv --parts kernel \
    --out "$OUT/mla_fp8_kv_${DEV}_kernel.json"
  cmd mla_fp8_kv_e2e 36 0 48 "$run" -- "$PY" -m moelink.benchmarks.mla_fp8_kv --parts e2e "${quick[@]}" \
    --out "$OUT/mla_fp8_kv_${DEV}_e2e${tag}.json"
}

# kv-transfer: no Triton kernel; each handoff starts a spawned prefill process (CUDA context ~15 s) per transport
# and shape x tokens (3 x 2 x 2 full, 3 x 2 x 1 quick).
step_kv_transfer() {
  local args=() run=480 a
  for a in "$@"; do
    case "$a" in
      --quick) args=(--tokens 1024 --repeats 2); run=240 ;;
      *) echo "kv-transfer: unknown argument '$a' (--quick)" >&2; exit 2 ;;
    esac
  done
  if [[ $MODE == cpu-smoke ]]; then
    cmd kv_transfer 0 0 0 120 -- "$PY" -m moelink.benchmarks.kv_transfer_engines --device cpu --shape deepseek-v3 \
      --tokens 64 --repeats 1 --json "$OUT/kv_transfer_engines_${DEV}.json"
    return 0
  fi
  cmd kv_transfer 0 0 0 "$run" -- "$PY" -m moelink.benchmarks.kv_transfer_engines --device cuda "${args[@]}" \
    --json "$OUT/kv_transfer_engines_${DEV}.json"
}

# compile-report: every kernel at every default/tuned/published config, compiled for sm_90 offline
# (compile counts: ~150 GEMM + ~60 other, measured 2026-11-22; no GPU needed, so it runs anywhere).
step_compile_report() {
  local args=()
  [[ $MODE == cpu-smoke ]] && args=(--quick --no-published)
  cmd compile_report 0 0 0 480 -- "$PY" -m moelink.benchmarks.compile_report "${args[@]}" \
    --out "$OUT/compile_report_sm90_$(safe_name "$("$PY" -c 'import triton; print(triton.__version__)' 2>/dev/null || echo unknown)")"
}

step_unpack() {  # FILE...: tuned tarballs (or single JSON files) -> kernels/configs, checked on the way
  [[ $# -gt 0 ]] || { echo "unpack: give the tuned_configs_*.tar.gz files" >&2; exit 2; }
  local dest="${UNPACK_DEST:-$REPO/kernels/configs}" f tmp
  tmp=$(mktemp -d)
  for f in "$@"; do
    case "$f" in
      *.tar.gz|*.tgz)
        local m
        for m in $(tar -tzf "$f"); do  # (the pattern of moelink.kernels.moe_config.tuned_file_name_ok)
          [[ $m =~ ^(fp8_w8a8,|mxfp4,|batch_invariant,)?E=[0-9]+,N=[0-9]+,device_name=[A-Za-z0-9._-]+\.json$ ]] \
            || { echo "unpack: $f holds '$m', not a tuned config file name: refused" >&2; exit 2; }
        done
        tar -xzf "$f" -C "$tmp" ;;
      *.json) cp "$f" "$tmp/" ;;
      *) echo "unpack: $f is neither a .tar.gz nor a .json" >&2; exit 2 ;;
    esac
  done
  # This checkout's moelink through the shim: what moelink_here would check for with a Python start (an import of
  # torch) of its own, after the names are checked (a refused tarball starts no Python at all).
  use_shim
  "$PY" - "$tmp" "$dest" <<'EOF' || exit 2
import shutil, sys
from pathlib import Path
from moelink.kernels.moe_config import load_config_file, tuned_file_name_ok
src, dest = Path(sys.argv[1]), Path(sys.argv[2])
for p in sorted(src.iterdir()):
    if not tuned_file_name_ok(p.name):
        sys.exit(f"unpack: {p.name} is not a tuned config file name ([fp8_w8a8,|mxfp4,|batch_invariant,]E=..,N=..,device_name=...json)")
    key, buckets = load_config_file(str(p))  # raises on a malformed file
    shutil.copyfile(p, dest / p.name)
    print(f"unpacked {dest / p.name}: {len(buckets)} buckets ({', '.join(str(b) for b, _ in buckets)})")
EOF
  rm -rf "$tmp"
}

step_plan() {  # the first plan, then the full session, one device command per line, with budgets (dry-runs)
  first_plan_print
  echo
  echo "full plan (every device command of a full session, in order, each with its budget)"
  local total=0 line b
  local steps=("preflight" "tests-kernels" "tests-engine")
  local s
  for s in "${SHAPES[@]}"; do steps+=("moe $s"); done
  for s in "${SHAPES[@]}"; do steps+=("tune $s"); done
  steps+=("decode" "tests-fp8")
  for s in "${FP8_SHAPES[@]}"; do steps+=("moe-fp8 $s"); done
  for s in "${FP8_SHAPES[@]}"; do steps+=("tune-fp8 $s"); done
  steps+=("moe-mxfp4" "moe-nvfp4")
  for s in "${MXFP4_SHAPES[@]}"; do steps+=("tune-mxfp4 $s"); done
  for s in "${E2E_MODELS[@]}"; do steps+=("e2e --model $s" "e2e --model $s --dtype fp8" "e2e --serve --model $s"); done
  steps+=("mla-fp8-kv")
  for s in "${E2E_MODELS[@]}"; do steps+=("spec --model $s"); done
  steps+=("kv-transfer" "hybrid" "dsa" "int4" "dsv4" "rl" "lora" "mm")
  for ((s = 1; s <= ROUND3_COUNT; s++)); do steps+=("round3 $s"); done
  for s in "${steps[@]}"; do
    line=$(bash "$REPO/benchmarks/gpu_session.sh" --dry-run $s | grep '^STEP ')
    b=$(sed -E 's/.*total_budget_s=([0-9]+).*/\1/' <<<"$line")
    total=$((total + b))
    printf '%-28s budget %4s s   OUT=$OUT bash benchmarks/gpu_session.sh %s\n' "$s" "$b" "$s"
  done
  echo "total $total s of device time on a cold cache (a lease holds 1800 s: later commands reuse the Triton cache;"
  echo "TUNE_BUDGET_S=<s> shortens a tune step: every bucket it reaches is still at least as fast as its seed)"
}

step_preflight() {
  local dev
  dev=$(device_label)
  # ~12 Python starts that import torch or triton (~3 s each), and on a GPU one tiny Triton kernel (launcher included)
  plan_only preflight 0 0 1 40 "checks in this shell; on a GPU one Triton kernel compiled and launched (timeout 120)"
  [[ $MODE == dry-run ]] && return 0
  # Its record goes to $OUT only when OUT was given (a device command); a local run only prints it.
  local outf="$STATE/preflight_${dev}.txt"
  [[ -n $OUT_GIVEN ]] && outf="$OUT/preflight_${dev}.txt"
  mkdir -p "$(dirname "$outf")" "$STATE"
  preflight 0 | tee "$outf"
  if [[ $MODE == run ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit,driver_version --format=csv >>"$outf" 2>&1 || true
  fi
  if [[ $MODE == run && -n "$PY" ]] && "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    decide_import 1 >/dev/null
    # One tiny Triton kernel compiled and launched on the GPU: the C compiler, Python.h, ptxas and the driver at once.
    # (from a file: Triton reads a @jit function's source with inspect, which a script piped to stdin has not;
    # the second GPU session's preflight failed so, 2026-11-22)
    cat >"$STATE/preflight_kernel.py" <<'EOF'
import torch, triton, triton.language as tl
@triton.jit
def _k(x_ptr):
    tl.store(x_ptr + tl.arange(0, 16), tl.arange(0, 16).to(tl.float32))
x = torch.zeros(16, device="cuda")
_k[(1,)](x)
torch.cuda.synchronize()
assert x.tolist() == list(map(float, range(16))), x
print("triton launch on the GPU: ok")
EOF
    timeout 120 "$PY" "$STATE/preflight_kernel.py" >>"$outf" 2>&1 && say "triton launch on the GPU: ok" \
      || say "triton launch on the GPU FAILED: see $outf"
  fi
  return 0
}

# The first plan (first N) and what travels with a device command (prepare, the commit, the serving wheels).
source "$REPO/benchmarks/gpu_session/carry.sh"
source "$REPO/benchmarks/gpu_session/first.sh"
source "$REPO/benchmarks/gpu_session/hybrid.sh"
source "$REPO/benchmarks/gpu_session/dsa.sh"
source "$REPO/benchmarks/gpu_session/int4.sh"
source "$REPO/benchmarks/gpu_session/dsv4.sh"
source "$REPO/benchmarks/gpu_session/rl.sh"
source "$REPO/benchmarks/gpu_session/lora.sh"
source "$REPO/benchmarks/gpu_session/round3.sh"
source "$REPO/benchmarks/gpu_session/mm.sh"

# -- main ---------------------------------------------------------------------------------------------------------------
case "$STEP" in
  preflight) step_preflight; finish_step; exit 0 ;;
  plan) step_plan; exit 0 ;;
  prepare) [[ -n "$PY" ]] || { echo "no python" >&2; exit 2; }; step_prepare "$@"; exit 0 ;;
  first) first_main "$@" ;;
  unpack)
    [[ -n "$PY" ]] || { echo "no python" >&2; exit 2; }
    step_unpack "$@"; exit $? ;;
  tests-kernels|tests-engine|tests-fp8|tests|moe|moe-fp8|moe-mxfp4|moe-nvfp4|tune|tune-fp8|tune-mxfp4|tune-invariant|decode|e2e|mla-fp8-kv|spec|kv-transfer|hybrid|dsa|int4|dsv4|rl|lora|mm|round3|compile-report|all) ;;
  ""|-h|--help) sed -n '2,81p' "${BASH_SOURCE[0]}"; exit 0 ;;
  *) echo "step must be prepare, first N, preflight, tests-kernels, tests-engine, tests-fp8, moe SHAPE, moe-fp8 SHAPE, moe-mxfp4, moe-nvfp4, tune SHAPE, tune-fp8 SHAPE, tune-mxfp4 SHAPE, tune-invariant SHAPE, decode, e2e, mla-fp8-kv, spec, kv-transfer, hybrid, dsa, int4, dsv4, rl, lora, mm, round3 N, compile-report, unpack, plan or all (got '$STEP')" >&2; exit 2 ;;
esac

DEV=$(device_label)
[[ $MODE == cpu-smoke ]] && DEV=cpu_smoke
setup
[[ $MODE == run ]] && command -v nvidia-smi >/dev/null && \
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.limit --format=csv >"$OUT/gpu_${DEV}_nvidia_smi.csv" 2>/dev/null
[[ $MODE == run ]] && say "device: $DEV, step: $STEP $*"
case "$STEP" in
  tests-kernels) step_tests_kernels ;;
  tests-engine) step_tests_engine ;;
  tests-fp8) step_tests_fp8 ;;
  tests) step_tests_kernels; step_tests_engine ;;
  moe) step_moe "$@" ;;
  moe-fp8) step_moe_fp8 "$@" ;;
  moe-mxfp4) step_moe_mxfp4 "$@" ;;
  moe-nvfp4) step_moe_nvfp4 "$@" ;;
  tune) step_tune "$@" ;;
  tune-fp8) step_tune_fp8 "$@" ;;
  tune-mxfp4) step_tune_mxfp4 "$@" ;;
  tune-invariant) step_tune_invariant "$@" ;;
  decode) step_decode "$@" ;;
  e2e) step_e2e "$@" ;;
  mla-fp8-kv) step_mla_fp8_kv "$@" ;;
  spec) step_spec "$@" ;;
  kv-transfer) step_kv_transfer "$@" ;;
  hybrid) step_hybrid "$@" ;;
  dsa) step_dsa "$@" ;;
  int4) step_int4 "$@" ;;
  dsv4) step_dsv4 "$@" ;;
  rl) step_rl "$@" ;;
  lora) step_lora "$@" ;;
  mm) step_mm "$@" ;;
  round3) step_round3 "$@" ;;
  compile-report) step_compile_report ;;
  all)
    step_tests_kernels; step_tests_engine
    for s in "${SHAPES[@]}"; do step_moe "$s" "$@"; done
    for s in "${SHAPES[@]}"; do step_tune "$s"; done
    step_decode "$@"
    step_tests_fp8
    for s in "${FP8_SHAPES[@]}"; do step_moe_fp8 "$s" "$@"; done
    for s in "${FP8_SHAPES[@]}"; do step_tune_fp8 "$s"; done
    step_moe_mxfp4 "$@"
    step_moe_nvfp4 "$@"
    for s in "${MXFP4_SHAPES[@]}"; do step_tune_mxfp4 "$s"; done
    for s in "${E2E_MODELS[@]}"; do step_e2e --model "$s"; step_e2e --model "$s" --dtype fp8; step_e2e --serve --model "$s"; done
    step_mla_fp8_kv
    for s in "${E2E_MODELS[@]}"; do step_spec --model "$s"; done
    step_kv_transfer
    step_hybrid
    step_dsa
    step_int4
    step_dsv4
    step_rl
    step_lora
    step_mm ;;
esac
[[ $STEP != all && $STEP != tests ]] && finish_step
exit "$STATUS"
