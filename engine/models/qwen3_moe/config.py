"""Qwen3-MoE's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    Architecture("Qwen3MoeForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ), model_type="qwen3_moe"),
)
