"""Kimi K3's config reader.

Its text_config, as transformers' KimiLinearConfig reads it (Kimi Linear's fields: layer_types from
linear_attn_config's 1-indexed kda_layers / full_attn_layers, mlp_layer_types from first_k_dense_replace; K3's own
kept as they are), onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read` after the common
fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import dataclasses

from ..mla_config import MLAConfig
from ..rope_config import RopeConfig
from ...config.refusals import unsupported
from ..kimi_delta_config import KimiDeltaConfig
from ...config.reader_parts import MLP_TYPES, layer_kinds, mla_fields, noaux_tc_moe
from .kimi_k3_config import KimiK3Fields

_LAYER_TYPES = ("full_attention", "linear_attention")


def _linear_attention(hf) -> KimiDeltaConfig:
    """KDA as K3 configures it (linear_attn_config): Kimi Linear's low-rank forget gate, a full-rank output gate
    (use_full_rank_gate: g_proj) and the bounded forget gate (gate_lower_bound: lower_bound * sigmoid(exp(A_log) x),
    as vLLM, SGLang and mlx-lm compute it for K3); A_log and dt_bias held in float32, as published."""
    la = getattr(hf, "linear_attn_config", None) or {}
    full = la.get("use_full_rank_gate", False)
    if not isinstance(full, bool):
        raise unsupported("linear_attn_config.use_full_rank_gate", full, (True, False))
    bound = la.get("gate_lower_bound")
    return KimiDeltaConfig(int(hf.linear_num_heads), int(hf.linear_num_heads), int(hf.linear_head_dim),
                           int(hf.linear_head_dim), int(hf.linear_conv_kernel_dim), forget_gate="low_rank",
                           output_gate="full" if full else "low_rank",
                           gate_lower_bound=None if bound is None else float(bound), a_log_float32=True)


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Kimi K3's text model: Kimi Delta Attention or NoPE MLA per layer_types (MLA: q LoRA, kv_lora_rank latent,
    qk_rope_head_dim dims kept unrotated, softmax scale (qk_nope + qk_rope)^-0.5, sigmoid(g_proj(x)) per value on
    its output when mla_use_output_gate); a dense MLP or a latent MoE per mlp_layer_types (sigmoid scores in
    float32, noaux_tc with the correction bias, renormalised when moe_renormalize, times routed_scaling_factor;
    num_shared_experts shared ones of moe_intermediate_size each); SiTU everywhere; attention residuals over blocks
    of attn_res_block_size layers (KimiK3Fields)."""
    d = hf.to_dict()
    k3 = KimiK3Fields.read(d, c["hidden_size"], c["num_layers"])
    layer_types = layer_kinds(hf, "layer_types", _LAYER_TYPES, c["num_layers"],
                              " (linear_attn_config's kda_layers and full_attn_layers)")
    mlp_types = layer_kinds(hf, "mlp_layer_types", MLP_TYPES, c["num_layers"])
    if d.get("mla_use_nope", True) is not True:
        raise unsupported("mla_use_nope", d.get("mla_use_nope"), (True,), " for Kimi K3 (its MLA has no rotary)")
    if d.get("moe_router_activation_func", "sigmoid") != "sigmoid":
        raise unsupported("moe_router_activation_func", d.get("moe_router_activation_func"), ("sigmoid",))
    gate = d.get("mla_use_output_gate", False)
    if not isinstance(gate, bool):
        raise unsupported("mla_use_output_gate", gate, (True, False))
    f = mla_fields(hf, c)
    nope, pe = f["qk_nope_head_dim"], f["qk_rope_head_dim"]
    # No rotary anywhere: the table is never read past position 0 (MLAConfig.rotary), so its kind is moot.
    mla = MLAConfig(**f, rope=RopeConfig(pe, c["rope_theta"], "default", "neox"), softmax_scale=(nope + pe) ** -0.5,
                    rotary=False, output_gate=gate, output_gate_values=gate)
    kda = _linear_attention(hf)
    moe = noaux_tc_moe(hf, c, int(hf.num_local_experts), mlp_types, int(getattr(hf, "n_shared_experts", 0) or 0))
    moe["moe"] = dataclasses.replace(moe["moe"], activation=k3.activation, dense_activation=k3.activation,
                                     situ_beta=k3.situ_beta, situ_linear_beta=k3.situ_linear_beta)
    return dict(num_kv_heads=c["num_heads"], attention=mla,
                layer_attention=tuple(mla if t == "full_attention" else kda for t in layer_types), **moe)


__all__ = ["read"]
