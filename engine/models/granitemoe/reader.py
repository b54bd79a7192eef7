"""Granite-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import math

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import MAX_WIDTH, gqa, rope_config

# The muP multipliers transformers' model applies (kinds.py folds all but attention_multiplier into the weights).
MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier")


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Granite-MoE as transformers 5.24 builds it (GraniteMoeForCausalLM, GraniteMoeSharedForCausalLM): every layer
    GQA (biases on q/k/v/o when attention_bias) whose softmax scale is attention_multiplier, not head_dim ** -0.5;
    every layer routed: the top-k of the router's logits, softmax over those k (gpt-oss's "topk_softmax"), experts
    of intermediate_size, plus (the Shared model) one shared MLP of shared_intermediate_size; the embeddings times
    embedding_multiplier, each block's output times residual_multiplier before the residual add, the logits divided
    by logits_scaling. Float checkpoints only: the multipliers are folded into the weights at load."""
    values = {}
    for name in MULTIPLIERS:
        v = getattr(hf, name, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise unsupported(name, v, "a finite number > 0")
        values[name] = float(v)
    q = c["quantization"]
    if q is not None:
        raise unsupported("quantization_config", getattr(q, "method", q), "none",
                          f" for {arch} (its muP multipliers are folded into float weights)")
    shared = int(getattr(hf, "shared_intermediate_size", 0) or 0) if arch == "GraniteMoeSharedForCausalLM" else 0
    if not 0 <= shared <= MAX_WIDTH:
        raise unsupported("shared_intermediate_size", shared, f"an integer in [0, {MAX_WIDTH}] (0: no shared MLP)")
    E, inter, bias = int(hf.num_local_experts), int(hf.intermediate_size), bool(getattr(hf, "attention_bias", False))
    router = RouterConfig(E, c["top_k"], "softmax", "topk_softmax", norm_topk_prob=True)
    return dict(num_experts=E, moe_intermediate_size=inter, intermediate_size=inter, norm_topk_prob=True,
                sparse_layers=tuple(range(c["num_layers"])),
                moe=MoEConfig(router, n_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared),
                attention=gqa(c, rope_config(rope, c, c["head_dim"]), qkv_bias=bias, o_bias=bias,
                              scale=values["attention_multiplier"]))


__all__ = ["MULTIPLIERS", "read"]
