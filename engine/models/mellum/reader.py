"""Mellum's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ..gqa_config import GQAConfig
from ..rope_config import RopeConfig
from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, MLP_TYPES, layer_kinds, rotary_dim


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Mellum as transformers 5.24 builds it (MellumForCausalLM): Qwen3-MoE's attention (per-head q/k RMSNorm before
    the rotary, attention_bias on q/k/v and o_proj alike), a sliding window on the layers layer_types calls
    sliding_attention, each layer type's own rope (rope_parameters.full_attention / .sliding_attention: its theta;
    over the whole head: a partial_rotary_factor other than 1 is refused, transformers' Mellum fails on it);
    mlp_layer_types' "sparse" layers routed (softmax top-k in float32, renormalised when norm_topk_prob), the "dense"
    ones a dense MLP of intermediate_size. The MTP layer
    (num_mtp_layers) is not read: speculative method "mtp" has no Mellum drafter."""
    layers = c["num_layers"]
    layer_types = layer_kinds(hf, "layer_types", LAYER_TYPES, layers)
    mlp_types = layer_kinds(hf, "mlp_layer_types", MLP_TYPES, layers)
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    window = getattr(hf, "sliding_window", None) if sliding else None
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer: layer_types names sliding_attention layers")
    by_kind_rope = rope if all(k in LAYER_TYPES for k in rope) and rope else {t: rope for t in set(layer_types)}
    if not set(layer_types) <= set(by_kind_rope):
        raise unsupported("rope_parameters", sorted(rope), f"one rope per layer type "
                                                           f"({', '.join(sorted(set(layer_types)))})")
    E = getattr(hf, "num_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("num_experts", E, "a positive integer")
    sparse = tuple(i for i, t in enumerate(mlp_types) if t == "sparse")
    if not sparse:
        raise unsupported("mlp_layer_types", list(mlp_types), "at least one 'sparse' layer")
    bias = bool(getattr(hf, "attention_bias", False))
    H = c["head_dim"]

    def attention(kind: str) -> GQAConfig:
        params = by_kind_rope[kind]
        theta = params.get("rope_theta", c["rope_theta"])
        factor = params.get("partial_rotary_factor", 1.0)
        if factor != 1.0:  # Laguna's rotary sizes its table by it, Mellum's attention rotates the whole head
            raise unsupported(f"rope_parameters.{kind}.partial_rotary_factor", factor, (1.0,),
                              " (transformers' Mellum rotates whole heads: a partial table builds no model)")
        r = RopeConfig(rotary_dim(H, factor), float(theta), params["rope_type"], "neox",
                       kind if params is not rope else None)
        return GQAConfig(c["num_heads"], c["num_kv_heads"], H, r, qk_norm="per_head", qkv_bias=bias, o_bias=bias,
                         sliding_window=window, sliding_layers=sliding)

    by_kind = {kind: attention(kind) for kind in sorted(set(layer_types))}
    full = by_kind.get("full_attention", by_kind.get("sliding_attention"))
    norm = bool(hf.norm_topk_prob)
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm, sparse_layers=sparse,
                moe=MoEConfig(RouterConfig(E, c["top_k"], norm_topk_prob=norm)), rope_theta=full.rope.theta,
                attention=full, layer_attention=tuple(by_kind[t] for t in layer_types))


__all__ = ["read"]
