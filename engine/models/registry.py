"""Model registry: `architectures` name in config.json → ArchSpec of the one decoder (moe_decoder.py).

A spec names the block kinds and the checkpoint's weight names; each family's own are in its package
(engine/models/<family>/config.py, gathered by engine/config/architectures.py). Routing, shapes, rope, q/k norm,
biases, dense and shared-expert layers are not part of it: ModelConfig (read from config.json by the family's
reader) holds them, so Qwen3-MoE's norm_topk_prob, GLM's use_qk_norm and DeepSeek's q_lora_rank are config facts.
The block kinds a family adds register when the decoder first looks a kind up (blocks/registry.py).
"""
from __future__ import annotations

from ..config.architectures import REGISTRY, SUPPORTED_ARCHITECTURES, ArchSpec
from .moe_decoder import MoEDecoderForCausalLM

# The runnable architectures' specs, from the one registry (engine/config/architectures.py).
ARCHITECTURES: dict[str, ArchSpec] = {n: a.spec for n, a in REGISTRY.items() if a.spec is not None}  # runnable


def arch_spec(architecture: str) -> ArchSpec:
    """The spec of a runnable architecture; one clear error for one whose config moelink only reads."""
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        raise ValueError(f"architecture {architecture}: config read, model definition not available in this build "
                         f"(moelink runs {', '.join(SUPPORTED_ARCHITECTURES)}).")
    return spec


__all__ = ["ARCHITECTURES", "ArchSpec", "MoEDecoderForCausalLM", "arch_spec"]
