"""Kimi Linear's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ...config.layer_configs import MLAConfig, MoEConfig, RopeConfig, unsupported
from ...config.linear_attention import KimiDeltaConfig

_LAYER_TYPES = ("full_attention", "linear_attention")
_MLP_TYPES = ("dense", "sparse")


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Kimi Linear as transformers 5.24 builds it (KimiLinearForCausalLM): layer_types (from linear_attn_config's
    kda_layers / full_attn_layers, 1-indexed) names each layer Kimi Delta Attention (linear_attn_config's num_heads
    heads of head_dim, a short convolution of short_conv_kernel_size) or MLA without any rotary (q_proj or q LoRA,
    kv_lora_rank latent, qk_rope_head_dim dims kept unrotated, softmax scale (qk_nope + qk_rope)^-0.5);
    mlp_layer_types a dense MLP or routed experts (sigmoid scores in float32, noaux_tc over n_group groups with the
    correction bias, renormalised when moe_renormalize, times routed_scaling_factor) beside num_shared_experts shared
    ones of moe_intermediate_size."""
    layers = c["num_layers"]
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    if len(layer_types) != layers or any(t not in _LAYER_TYPES for t in layer_types):
        raise unsupported("layer_types", list(layer_types), f"one of {', '.join(map(repr, _LAYER_TYPES))} for each of "
                                                            f"the num_hidden_layers={layers} layers (linear_attn_config"
                                                            f"'s kda_layers and full_attn_layers)")
    mlp_types = tuple(getattr(hf, "mlp_layer_types", None) or ())
    if len(mlp_types) != layers or any(t not in _MLP_TYPES for t in mlp_types):
        raise unsupported("mlp_layer_types", list(mlp_types), f"one of {', '.join(map(repr, _MLP_TYPES))} for each of "
                                                              f"the num_hidden_layers={layers} layers")
    if getattr(hf, "mlp_bias", False):
        raise unsupported("mlp_bias", True, (False,), f" for {arch} (transformers' MLPs have no bias)")
    nope, pe = int(hf.qk_nope_head_dim), int(hf.qk_rope_head_dim)
    q_lora = getattr(hf, "q_lora_rank", None)
    # No rotary anywhere: the table is never read past position 0 (MLAConfig.rotary), so its kind is moot.
    mla = MLAConfig(num_heads=c["num_heads"], q_lora_rank=int(q_lora) if q_lora is not None else None,
                    kv_lora_rank=int(hf.kv_lora_rank), qk_nope_head_dim=nope, qk_rope_head_dim=pe,
                    v_head_dim=int(hf.v_head_dim), rope=RopeConfig(pe, c["rope_theta"], "default", "neox"),
                    softmax_scale=(nope + pe) ** -0.5, attention_bias=bool(getattr(hf, "attention_bias", False)),
                    rotary=False)
    kda = KimiDeltaConfig(int(hf.linear_num_heads), int(hf.linear_num_heads), int(hf.linear_head_dim),
                          int(hf.linear_head_dim), int(hf.linear_conv_kernel_dim))
    E = int(hf.num_local_experts)
    norm = bool(hf.norm_topk_prob)
    router = RouterConfig(E, c["top_k"], "sigmoid", "noaux_tc", int(hf.n_group or 1), int(hf.topk_group or 1), norm,
                          float(hf.routed_scaling_factor or 1.0), float32_logits=True)
    sparse = tuple(i for i, t in enumerate(mlp_types) if t == "sparse")
    return dict(num_kv_heads=c["num_heads"], num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm, sparse_layers=sparse,
                moe=MoEConfig(router, int(getattr(hf, "n_shared_experts", 0) or 0)), attention=mla,
                layer_attention=tuple(mla if t == "full_attention" else kda for t in layer_types))


__all__ = ["read"]
