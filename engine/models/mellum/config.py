"""Mellum's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # Mellum: Qwen3-MoE's names (per-expert gate/up/down under mlp.experts, the router at mlp.gate, q_norm / k_norm
    # under self_attn); its MTP layer (top-level mtp.*, which transformers ignores too) is not read.
    Architecture("MellumForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, unread_prefixes=("mtp.",)),
                 model_type="mellum"),
)
