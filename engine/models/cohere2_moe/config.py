"""Cohere2-MoE's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

# transformers' names: model.layers.{i}.input_layernorm (the one norm of the parallel layer), self_attn.{q,k,v,o}_proj,
# mlp.gate / mlp.experts (per expert as saved: its conversion mapping is Qwen2-MoE's; or fused) / mlp.shared_experts,
# the dense prefix layers' mlp.{gate,up,down}_proj, model.norm; lm_head tied to the embedding as published.
_SPEC = ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, residual="cohere2_moe", head="cohere2_moe",
                 checkpoint="cohere2_moe")

ARCHITECTURES = (
    Architecture("Cohere2MoeForCausalLM", _SPEC, model_type="cohere2_moe",
                 lora_refused="its logit_scale (and an 'average' shared-expert combination) are folded into the "
                              "weights at load"),
)
