"""Qwen2-MoE's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # Qwen1.5-MoE / Qwen2-57B-A14B: per-expert gate/up/down under mlp.experts, the router at mlp.gate, one shared MLP
    # at mlp.shared_expert and its [1, D] sigmoid gate at mlp.shared_expert_gate (Qwen3-Next's names).
    Architecture("Qwen2MoeForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ,
                                                 shared_experts="shared_expert"), model_type="qwen2_moe"),
)
