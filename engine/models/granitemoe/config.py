"""Granite-MoE's registry entries (engine/config/architectures.py gathers them). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

# The experts are fused on disk as published (block_sparse_moe.input_linear [E, 2I, D], output_linear [E, D, I]; the
# router at block_sparse_moe.router.layer) or in transformers 5's names (block_sparse_moe.experts.gate_up_proj /
# down_proj, router.weight); the shared MLP at shared_mlp.input_linear [2S, D] / output_linear. The FFN kind
# "granite_moe" reads both (kinds.py); the checkpoint kind "granite_mup" folds the muP multipliers in after loading.
_SPEC = ArchSpec("gqa", moe_prefix="block_sparse_moe", expert_names=PROJ, router="router", shared_experts="shared_mlp",
                 ffn="granite_moe", checkpoint="granite_mup")

# An adapter's delta on o_proj or a down projection would miss the residual multiplier folded into their weights.
_LORA = "its muP multipliers are folded into the weights at load"

ARCHITECTURES = (
    Architecture("GraniteMoeForCausalLM", _SPEC, model_type="granitemoe", lora_refused=_LORA),
    Architecture("GraniteMoeSharedForCausalLM", _SPEC, model_type="granitemoeshared", lora_refused=_LORA),
    # Granite 4.0-H: Mamba2 layers (the shared "mamba2" kind, under `mamba.`) beside GQA ones, the same FFN and muP.
    Architecture("GraniteMoeHybridForCausalLM", _SPEC, model_type="granitemoehybrid", lora_refused=_LORA),
)
