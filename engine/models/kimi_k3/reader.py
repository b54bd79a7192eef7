"""Kimi K3's config reader.

Its text_config, as transformers' KimiLinearConfig reads it (Kimi Linear's fields: layer_types from
linear_attn_config's 1-indexed kda_layers / full_attn_layers, mlp_layer_types from first_k_dense_replace; K3's own
kept as they are), onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read` after the common
fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from ..mla_config import MLAConfig
from ..rope_config import RopeConfig
from ...config.refusals import unsupported
from ..kimi_delta_config import KimiDeltaConfig
from ...config.reader_parts import MLP_TYPES, layer_kinds, mla_fields, noaux_tc_moe

_LAYER_TYPES = ("full_attention", "linear_attention")


def _positive_int(name: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise unsupported(name, v, "a positive integer")
    return v


@dataclass(frozen=True)
class KimiK3Fields:
    """What Kimi K3 adds to Kimi Linear's fields, validated when the config is read; its block kinds (kinds.py) build
    from the same (transformers 5.24 has no Kimi K3 class: its KimiLinearConfig keeps these keys as they are).
    attn_res_block_size: layers per attention-residual block (a layer i with i % size == 0 opens one);
    latent_size: the routed experts' width (routed_expert_hidden_size), latent_norm: RMSNorm on their summed
    output before the up projection (latent_moe_use_norm); situ_beta / situ_linear_beta: SiTU's constants."""

    attn_res_block_size: int
    latent_size: int
    latent_norm: bool
    activation: str  # "situ" (config.json's hidden_act, K3's) or "silu": every MLP's, experts' and shared ones'
    situ_beta: float
    situ_linear_beta: float | None

    @classmethod
    def read(cls, d: Mapping[str, Any], hidden_size: int, num_layers: int) -> "KimiK3Fields":
        """From the text config's fields (`d`: transformers' config as a dict); a value moelink cannot run is refused
        naming the field."""
        block = _positive_int("attn_res_block_size", d.get("attn_res_block_size"))
        latent = _positive_int("routed_expert_hidden_size", d.get("routed_expert_hidden_size"))
        if latent > hidden_size:
            raise unsupported("routed_expert_hidden_size", latent, f"at most hidden_size ({hidden_size})")
        if block > num_layers:
            raise unsupported("attn_res_block_size", block, f"at most num_hidden_layers ({num_layers})")
        norm = d.get("latent_moe_use_norm", False)
        if not isinstance(norm, bool):
            raise unsupported("latent_moe_use_norm", norm, (True, False))
        act = d.get("hidden_act")
        if act not in ("situ", "silu"):
            raise unsupported("hidden_act", act, ("situ", "silu"), " for Kimi K3")
        beta = d.get("activation_situ_beta") or 1.0  # the peers' default (SGLang, vLLM, mlx-lm: `beta or 1.0`)
        linear = d.get("activation_situ_linear_beta")
        for name, v in (("activation_situ_beta", beta), ("activation_situ_linear_beta", linear)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0):
                raise unsupported(name, v, "a number > 0" + (" or null" if name.endswith("linear_beta") else ""))
        if act == "silu":  # SiLU everywhere: SiTU's constants unused
            beta, linear = 1.0, None
        return cls(block, latent, norm, act, float(beta), None if linear is None else float(linear))


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


__all__ = ["KimiK3Fields", "read"]
