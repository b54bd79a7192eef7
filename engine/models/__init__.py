"""Model registry: `architectures` name in config.json → ArchSpec of the shared MoE decoder."""
from __future__ import annotations

from .moe_decoder import ArchSpec, MoEDecoderForCausalLM

ARCHITECTURES: dict[str, ArchSpec] = {
    # Qwen3-MoE: per-head q/k RMSNorm; top-k renormalised only with norm_topk_prob.
    "Qwen3MoeForCausalLM": ArchSpec(
        qk_norm=True, moe_prefix="mlp", expert_names=("gate_proj", "up_proj", "down_proj"),
        renormalize=lambda cfg: cfg.norm_topk_prob,
    ),
    # Mixtral: softmax over the top-k logits, i.e. always renormalised.
    "MixtralForCausalLM": ArchSpec(
        qk_norm=False, moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"),
        renormalize=lambda cfg: True,
    ),
}

__all__ = ["ARCHITECTURES", "ArchSpec", "MoEDecoderForCausalLM"]
