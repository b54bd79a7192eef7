"""dots.llm1's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # dots.llm1: per-expert gate/up/down under mlp.experts, the router at mlp.gate with its correction bias at
    # mlp.gate.e_score_correction_bias, the shared experts at mlp.shared_experts (DeepSeek-V3's names), q_norm /
    # k_norm under self_attn (Qwen3's).
    Architecture("Dots1ForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ), model_type="dots1"),
)
