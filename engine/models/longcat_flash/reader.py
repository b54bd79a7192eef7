"""LongCat-Flash's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import math

from moelink.moe.router_config import RouterConfig

from ..mla_config import MLAConfig
from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import mla_fields, rope_config, yarn_apply_mscale


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """LongCat-Flash as transformers 5.24 builds it (LongcatFlashForCausalLM): num_layers layers of two sublayers
    each, read as num_hidden_layers = 2 * num_layers engine layers; every sublayer MLA with q LoRA and interleaved
    rope, its q scaled by sqrt(hidden_size / q_lora_rank) and its latent by sqrt(hidden_size / kv_lora_rank) (MLAConfig
    q_scale / latent_scale: folded into q_b_proj and kv_a_layernorm at load), softmax scale (qk_nope + qk_rope)^-0.5
    with yarn's mscale; a dense MLP of ffn_hidden_size in every sublayer; routed experts of expert_ffn_hidden_size on
    the first sublayer of each layer (the even engine layers), over n_routed_experts + zero_expert_num: softmax
    scores in float32, the top moe_topk of scores + e_score_correction_bias, their unbiased scores times
    routed_scaling_factor (never renormalised), a pick of a zero-computation expert the token itself."""
    if c["num_layers"] % 2:
        raise unsupported("num_hidden_layers", c["num_layers"], "an even number (2 * num_layers: two sublayers each)")
    if getattr(hf, "mlp_bias", False):
        raise unsupported("mlp_bias", True, (False,), f" for {arch} (transformers' MLPs have no bias)")
    if getattr(hf, "router_bias", False):
        raise unsupported("router_bias", True, (False,), f" for {arch} (moelink's router linear has no bias here)")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise unsupported("hidden_act", hf.hidden_act, ("silu",))
    f = mla_fields(hf, c)
    nope, pe, q_lora, kv_lora = f["qk_nope_head_dim"], f["qk_rope_head_dim"], f["q_lora_rank"], f["kv_lora_rank"]
    if q_lora is None:
        raise unsupported("q_lora_rank", None, "a positive integer (transformers' LongCat-Flash always has q LoRA)")
    # transformers' LongcatFlashRotaryEmbedding builds its table over head_dim: the rope part of each head.
    if int(getattr(hf, "head_dim", pe) or pe) != pe:
        raise unsupported("head_dim", hf.head_dim, (pe,), " (transformers rotates qk_rope_head_dim dims with a table "
                                                          "of head_dim: the published models set them equal)")
    if int(hf.qk_head_dim) != nope + pe:
        raise unsupported("qk_head_dim", hf.qk_head_dim, (nope + pe,), " (qk_nope_head_dim + qk_rope_head_dim)")
    attention = MLAConfig(
        **f, rope=rope_config(rope, c, pe, "interleaved"),
        softmax_scale=float(yarn_apply_mscale(rope, (nope + pe) ** -0.5)),
        q_scale=math.sqrt(c["hidden_size"] / q_lora), latent_scale=math.sqrt(c["hidden_size"] / kv_lora))
    E, Z = int(hf.n_routed_experts), int(hf.zero_expert_num or 0)
    if E < 1:
        raise unsupported("n_routed_experts", E, "a positive integer")
    top_k = int(hf.moe_topk)
    router = RouterConfig(E + Z, top_k, "softmax", "noaux_tc", 1, 1, False, float(hf.routed_scaling_factor),
                          float32_logits=True)  # transformers casts the router's input and weight to float32
    return dict(num_kv_heads=c["num_heads"], top_k=top_k, num_experts=E,
                moe_intermediate_size=int(hf.expert_ffn_hidden_size), intermediate_size=int(hf.ffn_hidden_size),
                norm_topk_prob=False, sparse_layers=tuple(range(0, c["num_layers"], 2)),
                moe=MoEConfig(router, zero_experts=Z), attention=attention)


__all__ = ["read"]
