"""Model registry: `architectures` name in config.json → ArchSpec of the one decoder (moe_decoder.py).

A spec names the attention kind and the checkpoint's weight names. Routing, shapes, rope, q/k norm, biases,
dense and shared-expert layers are not part of it: ModelConfig (read from config.json by engine/hf_readers.py)
holds them, so Qwen3-MoE's norm_topk_prob, GLM's use_qk_norm and DeepSeek's q_lora_rank are config facts.
"""
from __future__ import annotations

from ..config import SUPPORTED_ARCHITECTURES
from .moe_decoder import ArchSpec, MoEDecoderForCausalLM

_PROJ = ("gate_proj", "up_proj", "down_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    "Qwen3MoeForCausalLM": ArchSpec("gqa", moe_prefix="mlp", expert_names=_PROJ),
    "MixtralForCausalLM": ArchSpec("gqa", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
    # DeepSeek-V3/R1, Kimi K2, Mistral Large 3 (DeepSeek-V3 format); DeepSeek-V2 / V2-Lite.
    "DeepseekV3ForCausalLM": ArchSpec("mla", moe_prefix="mlp", expert_names=_PROJ),
    "DeepseekV2ForCausalLM": ArchSpec("mla", moe_prefix="mlp", expert_names=_PROJ),
    # GLM-4.5 / 4.6: GQA with partial rotary and the DeepSeek-V3 MoE block.
    "Glm4MoeForCausalLM": ArchSpec("gqa", moe_prefix="mlp", expert_names=_PROJ),
    # gpt-oss-20b / 120b in bf16 or float: GQA with sinks and sliding windows, fused experts with biases.
    "GptOssForCausalLM": ArchSpec("gqa", moe_prefix="mlp", expert_names=_PROJ, router="router", expert_layout="gpt_oss"),
}


def arch_spec(architecture: str) -> ArchSpec:
    """The spec of a runnable architecture; one clear error for one whose config moelink only reads."""
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        raise ValueError(f"architecture {architecture}: config read, model definition not available in this build "
                         f"(moelink runs {', '.join(SUPPORTED_ARCHITECTURES)}).")
    return spec


__all__ = ["ARCHITECTURES", "ArchSpec", "MoEDecoderForCausalLM", "arch_spec"]
