"""DBRX's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import math

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ..rope_config import RopeConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """DBRX as transformers 5.24 builds it (DbrxForCausalLM), its routing and attention in the sub-configs
    ffn_config and attn_config: every layer GQA (attn_config.kv_n_heads kv heads, head_dim d_model / n_heads) from one
    fused Wqkv whose output is clamped to [-clip_qkv, clip_qkv], rotary over the whole head; every layer routed:
    softmax over every expert in the model dtype, top moe_top_k, divided by their moe_normalize_expert_weights-norm
    (1: renormalised to sum to 1; null: as they are), experts ffn_hidden_size wide; LayerNorms without bias (eps
    1e-5). The rotary base is attn_config.rope_theta, the trained model's (transformers 5.24 reads none of it and
    rotates by rope_parameters, 10000 unless config.json says otherwise; the tests set both), else rope_parameters'."""
    attn, ffn = hf.attn_config, hf.ffn_config
    E, k = int(ffn.moe_num_experts), int(ffn.moe_top_k)
    act = (ffn.ffn_act_fn or {}).get("name", "silu")
    if act != "silu":
        raise unsupported("ffn_config.ffn_act_fn.name", act, ("silu",), " (moelink's experts are SiLU-gated)")
    p = ffn.moe_normalize_expert_weights
    if p is not None and p != 1:
        raise unsupported("ffn_config.moe_normalize_expert_weights", p, (1.0, None),
                          " (a p-norm other than the sum is not implemented)")
    if rope.get("rope_type", "default") != "default":
        raise unsupported("rope_parameters.rope_type", rope.get("rope_type"), ("default",), f" for {arch}")
    # attn_config.rope_theta where the file states it (the published ones do), else the base transformers rotates by.
    theta = getattr(attn, "rope_theta", None)
    theta = rope.get("rope_theta", 10000.0) if theta is None else theta
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
        raise unsupported("attn_config.rope_theta", theta, "a finite number > 0")
    if c["quantization"] is not None:  # its fused names are mapped for float weights only (kinds.py)
        raise unsupported("quantization_config", getattr(c["quantization"], "method", c["quantization"]), "none",
                          f" for {arch}")
    if c["num_heads"] * c["head_dim"] != c["hidden_size"]:
        raise unsupported("d_model", c["hidden_size"], f"a multiple of n_heads={c['num_heads']}")
    router = RouterConfig(E, k, norm_topk_prob=p is not None)
    inter = int(ffn.ffn_hidden_size)
    return dict(num_experts=E, top_k=k, moe_intermediate_size=inter, intermediate_size=inter,
                norm_topk_prob=p is not None, sparse_layers=tuple(range(c["num_layers"])), moe=MoEConfig(router),
                rms_norm_eps=1e-5,  # nn.LayerNorm's default, which DBRX's norms keep
                attention=gqa(c, RopeConfig(c["head_dim"], float(theta)), clip_qkv=attn.clip_qkv))


__all__ = ["read"]
