"""FlexOlmo's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """FlexOlmo as transformers 5.24 builds it (FlexOlmoForCausalLM): OLMo 2's attention (q and k RMS-normed whole,
    [num_attention_heads * head_dim] and [num_key_value_heads * head_dim] weights, before the split into heads, then
    the rotary over the whole head; attention_bias on q/k/v and o_proj alike) and OLMoE's routed experts in every
    layer (softmax top-k in float32, renormalised only when norm_topk_prob); each block's output RMS-normed before its
    residual add, the input never (residual kind "flex_olmo")."""
    E = getattr(hf, "num_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("num_experts", E, "a positive integer")
    bias = bool(getattr(hf, "attention_bias", False))
    norm = bool(hf.norm_topk_prob)
    return dict(num_experts=E, moe_intermediate_size=int(hf.intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm,
                sparse_layers=tuple(range(c["num_layers"])), moe=MoEConfig(RouterConfig(E, c["top_k"],
                                                                                        norm_topk_prob=norm)),
                attention=gqa(c, rope_config(rope, c, c["head_dim"]), qk_norm="all_heads", qkv_bias=bias,
                              o_bias=bias))


__all__ = ["read"]
