"""HunYuan-MoE-V1's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config


def _per_layer(hf, field_name: str, layers: int) -> int:
    """A count config.json gives as one integer or as one per layer (Hunyuan-A13B's moe_topk list): the one value,
    or a refusal naming the field where the layers differ."""
    v = getattr(hf, field_name)
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    if (not vals or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in vals)
            or (len(vals) > 1 and (len(vals) != layers or len(set(vals)) != 1))):
        raise unsupported(field_name, v, f"a positive integer, or one equal integer for each of the "
                                         f"num_hidden_layers={layers} layers")
    return vals[0]


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """HunYuan-MoE-V1 as transformers 5.24 builds it (HunYuanMoEV1ForCausalLM): every layer GQA whose q and k are
    rotated over the whole head and then RMS-normed per head (query_layernorm / key_layernorm: after the rotary,
    GQAConfig.qk_norm_after_rope), attention_bias on q/k/v and o_proj alike; every layer routed: softmax top-k of
    the float32 router (mlp.gate.wg), always renormalised, the experts intermediate_size wide, plus one ungated
    shared MLP of intermediate_size. moe_topk may be a list, one per layer: equal values only. The published rope is
    rope_type "dynamic" with an `alpha`, which transformers runs as a fixed NTK base, rope_theta * alpha **
    (head_dim / (head_dim - 2)); "dynamic" without alpha (a base that grows with the length) is refused. Hunyuan-
    Large's cross-layer attention (use_cla) is no part of transformers' model: refused where set."""
    layers, head_dim = c["num_layers"], c["head_dim"]
    if getattr(hf, "use_cla", False):
        raise unsupported("use_cla", hf.use_cla, "false (cross-layer KV sharing is not in transformers' "
                                                 "HunYuanMoEV1 model)")
    theta = c["rope_theta"]
    if rope["rope_type"] == "dynamic":
        alpha = rope.get("alpha")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise unsupported("rope_parameters.alpha", alpha, "a number > 0 with rope_type 'dynamic' (the fixed NTK "
                                                              "alpha: length-dependent dynamic scaling is not "
                                                              "supported)")
        theta = theta * alpha ** (head_dim / (head_dim - 2))  # transformers' compute_ntk_alpha_rope_parameters
    E = getattr(hf, "num_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("num_experts", E, "a positive integer (the same experts in every layer)")
    top_k = _per_layer(hf, "moe_topk", layers)
    inter = int(hf.intermediate_size)
    bias = bool(getattr(hf, "attention_bias", False))
    moe = MoEConfig(RouterConfig(E, top_k, norm_topk_prob=True, float32_logits=True), n_shared_experts=1,
                    shared_expert_intermediate_size=inter)
    fixed = dict(rope, rope_type="default") if rope["rope_type"] == "dynamic" else rope  # ntk_alpha: a plain base
    attention = gqa(c, rope_config(fixed, dict(c, rope_theta=theta), head_dim),
                    qk_norm="per_head", qk_norm_after_rope=True, qkv_bias=bias, o_bias=bias)
    return dict(top_k=top_k, rope_theta=theta, num_experts=E, moe_intermediate_size=inter, intermediate_size=inter,
                norm_topk_prob=True, sparse_layers=tuple(range(layers)), moe=moe, attention=attention)


__all__ = ["read"]
