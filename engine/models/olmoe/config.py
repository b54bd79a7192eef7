"""OLMoE's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # OLMoE-1B-7B: per-expert gate/up/down under mlp.experts, the router at mlp.gate, q_norm / k_norm under self_attn.
    Architecture("OlmoeForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ), model_type="olmoe"),
)
