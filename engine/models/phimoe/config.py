"""PhiMoE's registry entries (engine/config/architectures.py gathers them). No torch."""
from __future__ import annotations

from ...config.arch_spec import ArchSpec, Architecture

# Phi-3.5-MoE as published: per-expert w1 / w3 / w2 under block_sparse_moe, the router at block_sparse_moe.gate
# (Mixtral's names); q/k/v/o with biases; LayerNorms with biases around each layer and at the end (residual and head
# kinds "phimoe": kinds.py), the LM head's bias at lm_head.bias. transformers 5's own names (save_original_format=
# False: mlp.router, mlp.experts.gate_up_proj / down_proj) read through the aliases and the fused-expert layout.
SPEC = ArchSpec("gqa", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"), residual="phimoe",
                head="phimoe", weight_aliases=(("mlp.gate.weight", "mlp.router.weight"),))

ARCHITECTURES = (
    # transformers' class (model_type phimoe).
    Architecture("PhimoeForCausalLM", SPEC, model_type="phimoe", rope_types=("longrope",),
                 lora_refused="its LayerNorms and LM head bias are untested with adapters against peft"),
    # The name Phi-3.5-MoE's config.json and vLLM use.
    Architecture("PhiMoEForCausalLM", SPEC, model_type="phimoe", alias_of="PhimoeForCausalLM", rope_types=("longrope",),
                 lora_refused="its LayerNorms and LM head bias are untested with adapters against peft"),
)
