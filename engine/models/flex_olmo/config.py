"""FlexOlmo's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # FlexOlmo: per-expert gate/up/down under mlp.experts, the router at mlp.gate (OLMoE's names), q_norm / k_norm
    # under self_attn, post_attention_layernorm and post_feedforward_layernorm after the blocks (residual kind
    # "flex_olmo": no input_layernorm).
    Architecture("FlexOlmoForCausalLM",
                 ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, residual="flex_olmo", head="flex_olmo"),
                 model_type="flex_olmo"),
)
