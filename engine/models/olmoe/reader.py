"""OLMoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """OLMoE as transformers 5.24 builds it (OlmoeForCausalLM): every layer GQA whose q and k projections are
    RMS-normed whole (one [hidden_size] and one [K * head_dim] weight, before the split into heads: GQAConfig's
    "all_heads"), then, where clip_qkv is set, q, k and v clamped to [-clip_qkv, clip_qkv], then rotary over the whole
    head; attention_bias puts biases on q/k/v and o_proj alike; every layer routed: softmax top-k (in float32),
    renormalised only when norm_topk_prob (False in the published config); no shared experts, no dense layers."""
    heads, head_dim = c["num_heads"], c["head_dim"]
    if heads * head_dim != c["hidden_size"]:
        # transformers sizes q_norm by hidden_size: a head_dim that does not tile it builds no model.
        raise unsupported("head_dim", head_dim, f"hidden_size / num_attention_heads = {c['hidden_size'] / heads}")
    clip = getattr(hf, "clip_qkv", None)
    bias = bool(getattr(hf, "attention_bias", False))
    E = int(hf.num_experts)  # transformers' attribute_map: num_local_experts is the same field
    norm = bool(hf.norm_topk_prob)
    return dict(num_experts=E, moe_intermediate_size=int(hf.intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm,
                sparse_layers=tuple(range(c["num_layers"])), moe=MoEConfig(RouterConfig(E, c["top_k"],
                                                                                        norm_topk_prob=norm)),
                attention=gqa(c, rope_config(rope, c, head_dim), qk_norm="all_heads", qkv_bias=bias, o_bias=bias,
                              clip_qkv=clip))


__all__ = ["read"]
