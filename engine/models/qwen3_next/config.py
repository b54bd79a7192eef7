"""Qwen3-Next's and Qwen3.5-MoE's registry entries (engine/config/architectures.py gathers them). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # Qwen3-Next-80B-A3B: gated DeltaNet on three layers of four, gated full attention on the fourth, a shared expert
    # with a sigmoid gate beside the routed ones.
    Architecture("Qwen3NextForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ,
                                                  shared_experts="shared_expert"), model_type="qwen3_next",
                 mtp_layers=True, mtp_layout="qwen"),
    # Qwen3.5-MoE's text model (Qwen3.5-397B-A17B, -122B-A10B, -35B-A3B): Qwen3-Next's layers with split linear-attention
    # projections; published inside Qwen3_5MoeForConditionalGeneration checkpoints (TEXT_MODELS).
    Architecture("Qwen3_5MoeForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ,
                                                   shared_experts="shared_expert"), model_type="qwen3_5_moe_text",
                 mtp_layers=True, mtp_layout="qwen"),
)
# The multimodal wrapper whose text model is Qwen3.5-MoE, and where its "model." tensors live.
TEXT_MODELS = {"Qwen3_5MoeForConditionalGeneration": ("Qwen3_5MoeForCausalLM", "model.language_model.")}
