# Sourced by benchmarks/gpu_session.sh: the `lora` step (issue 60's LoRA adapters on a GPU), one device command.
# (Not a script of its own: it uses the main script's REPO, OUT, PY, MODE, DEV and run_pytest_files.)
#
# lora: tests/engine/test_gpu_lora_graphs.py (1 test, the tiny Qwen3-MoE in fp32 with two LoRA slots: an eager engine,
#   then one with decode graphs at 1/2/4/8; one prompt under two adapters and the base in one batch replayed through
#   padded graphs, then a third adapter loaded into a slot after the capture, then an adapter on the routed experts'
#   gate_up_proj and down_proj beside the base (its decode steps replayed: kernels/triton_lora_moe.py captured), each request the
#   eager engine's tokens and logprobs: docs/lora.md). Compiles: the MoE up / down at the decode and prefill buckets
#   and the LoRA experts' up (ROW_BIAS) / down (6 GEMM), fp32 attention decode split / no split and prefill (3 slow),
#   LoRA shrink and expand, the experts' sorted shrink and expand, align, sum, merge, KV write, norms, rotary, router
#   top-k, SiLU-mul (14 other); run 60 s (measured on an H100, 2026-11-27: 47 s for the whole test with its cold compiles: two
#   tiny engine starts with warm-up, the second capturing 4 graphs, ~50 decode steps).
LORA_GEMM=6
LORA_SLOW=3
LORA_OTHER=14
LORA_RUN_S=60
step_lora() {
  local a
  for a in "$@"; do
    echo "lora: unknown argument '$a' (none taken)" >&2
    exit 2
  done
  resolve_commit
  run_pytest_files "gpu_lora_${DEV}_${COMMIT}.txt" \
    lora_graphs_gpu "$LORA_GEMM" "$LORA_SLOW" "$LORA_OTHER" "$LORA_RUN_S" tests/engine/test_gpu_lora_graphs.py
}
