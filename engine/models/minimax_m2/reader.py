"""MiniMax-M2's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config, rotary_dim


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """MiniMax-M2: every layer full GQA (attn_type_list all 1: M2 has none of MiniMax-01's lightning attention)
    with q and k RMS-normed across all heads at once (one [N * H] and one [K * H] weight, applied to the
    projections before they split into heads: qk_norm_type "per_layer"), rotary over the first rotary_dim dims of
    each head (transformers turns rotary_dim into partial_rotary_factor); every layer routed over
    num_local_experts: sigmoid scores, the top-k of scores + e_score_correction_bias, weighted by the unbiased
    scores renormalised to sum to 1 (DeepSeek-V3's noaux_tc with one group), the gate in the model dtype; no
    shared experts. transformers' model reads none of the flags below: a file that sets one otherwise describes
    a model it does not build, and is refused."""
    kinds = getattr(hf, "attn_type_list", None)
    if kinds is not None and (not isinstance(kinds, (list, tuple)) or len(kinds) != c["num_layers"]
                              or any(k != 1 for k in kinds)):
        raise unsupported("attn_type_list", kinds, f"1 (full attention) for each of the num_hidden_layers="
                                                   f"{c['num_layers']} layers (MiniMax-M2 has no lightning-attention "
                                                   f"layers, 0)")
    for name, want in (("use_qk_norm", True), ("qk_norm_type", "per_layer"), ("scoring_func", "sigmoid"),
                       ("use_routing_bias", True), ("shared_intermediate_size", 0), ("routed_scaling_factor", 1.0)):
        value = getattr(hf, name, None)
        if value is not None and value != want:
            raise unsupported(name, value, (want,), f" for {arch} (transformers' model runs {name}={want!r})")
    E = int(hf.num_local_experts)
    router = RouterConfig(E, c["top_k"], "sigmoid", "noaux_tc", 1, 1, norm_topk_prob=True)
    factor = rope.get("partial_rotary_factor", 1.0)
    return dict(num_experts=E, moe_intermediate_size=int(hf.intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=True,
                sparse_layers=tuple(range(c["num_layers"])), moe=MoEConfig(router),
                attention=gqa(c, rope_config(rope, c, rotary_dim(c["head_dim"], factor, "rotary_dim / head_dim")),
                               qk_norm="all_heads"))



__all__ = ["read"]
