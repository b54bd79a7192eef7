"""Model registry: `architectures` name in config.json → ArchSpec of the one decoder (moe_decoder.py), and the
families' packages, whose import registers their block kinds (blocks/).

A spec names the block kinds and the checkpoint's weight names. Routing, shapes, rope, q/k norm, biases,
dense and shared-expert layers are not part of it: ModelConfig (read from config.json by engine/config/hf_readers.py)
holds them, so Qwen3-MoE's norm_topk_prob, GLM's use_qk_norm and DeepSeek's q_lora_rank are config facts.
Must not import: benchmarks, engine, engine.api, engine.cluster, engine.core, engine.kv_transfer, engine.rank, engine.server, engine.spec, engine.spec.heads, engine.tools.
"""
from __future__ import annotations

from ..config.architectures import REGISTRY, SUPPORTED_ARCHITECTURES, ArchSpec
from .moe_decoder import MoEDecoderForCausalLM

# The families with block kinds of their own, one line each: importing the package registers its kinds
# (engine/models/blocks/registry.py). A family whose layers are the built-in kinds needs no line.
from . import deepseek_v4  # noqa: F401

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
