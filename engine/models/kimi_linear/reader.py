"""Kimi Linear's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from ..mla_config import MLAConfig
from ..rope_config import RopeConfig
from ...config.refusals import unsupported
from ..kimi_delta_config import KimiDeltaConfig
from ...config.reader_parts import MLP_TYPES, layer_kinds, mla_fields, noaux_tc_moe

_LAYER_TYPES = ("full_attention", "linear_attention")


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Kimi Linear as transformers 5.24 builds it (KimiLinearForCausalLM): layer_types (from linear_attn_config's
    kda_layers / full_attn_layers, 1-indexed) names each layer Kimi Delta Attention (linear_attn_config's num_heads
    heads of head_dim, a short convolution of short_conv_kernel_size) or MLA without any rotary (q_proj or q LoRA,
    kv_lora_rank latent, qk_rope_head_dim dims kept unrotated, softmax scale (qk_nope + qk_rope)^-0.5);
    mlp_layer_types a dense MLP or routed experts (sigmoid scores in float32, noaux_tc over n_group groups with the
    correction bias, renormalised when moe_renormalize, times routed_scaling_factor) beside num_shared_experts shared
    ones of moe_intermediate_size."""
    layer_types = layer_kinds(hf, "layer_types", _LAYER_TYPES, c["num_layers"],
                              " (linear_attn_config's kda_layers and full_attn_layers)")
    mlp_types = layer_kinds(hf, "mlp_layer_types", MLP_TYPES, c["num_layers"])
    if getattr(hf, "mlp_bias", False):
        raise unsupported("mlp_bias", True, (False,), f" for {arch} (transformers' MLPs have no bias)")
    f = mla_fields(hf, c)
    nope, pe = f["qk_nope_head_dim"], f["qk_rope_head_dim"]
    # No rotary anywhere: the table is never read past position 0 (MLAConfig.rotary), so its kind is moot.
    mla = MLAConfig(**f, rope=RopeConfig(pe, c["rope_theta"], "default", "neox"), softmax_scale=(nope + pe) ** -0.5,
                    rotary=False)
    kda = KimiDeltaConfig(int(hf.linear_num_heads), int(hf.linear_num_heads), int(hf.linear_head_dim),
                          int(hf.linear_head_dim), int(hf.linear_conv_kernel_dim))
    return dict(num_kv_heads=c["num_heads"], attention=mla,
                layer_attention=tuple(mla if t == "full_attention" else kda for t in layer_types),
                **noaux_tc_moe(hf, c, int(hf.num_local_experts), mlp_types,
                               int(getattr(hf, "n_shared_experts", 0) or 0)))


__all__ = ["read"]
