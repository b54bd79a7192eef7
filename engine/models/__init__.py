"""Model registry: `architectures` name in config.json → ArchSpec of the shared MoE decoder.

Routing is not part of a spec: ModelConfig.moe.router (read from config.json in engine/config.py) decides
it, so Qwen3-MoE's norm_topk_prob and Mixtral's always-renormalised top-k are both config facts.
"""
from __future__ import annotations

from ..config import SUPPORTED_ARCHITECTURES
from .moe_decoder import ArchSpec, MoEDecoderForCausalLM

ARCHITECTURES: dict[str, ArchSpec] = {
    # Qwen3-MoE: per-head q/k RMSNorm.
    "Qwen3MoeForCausalLM": ArchSpec(qk_norm=True, moe_prefix="mlp", expert_names=("gate_proj", "up_proj", "down_proj")),
    "MixtralForCausalLM": ArchSpec(qk_norm=False, moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
}


def arch_spec(architecture: str) -> ArchSpec:
    """The spec of a runnable architecture; one clear error for one whose config moelink only reads."""
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        raise ValueError(f"architecture {architecture}: config read, model definition not available in this build "
                         f"(moelink runs {', '.join(SUPPORTED_ARCHITECTURES)}).")
    return spec


__all__ = ["ARCHITECTURES", "ArchSpec", "MoEDecoderForCausalLM", "arch_spec"]
