"""Ling's hybrid config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from ..mla_config import MLAConfig
from ...config.refusals import unsupported
from ..kimi_delta_config import KimiDeltaConfig
from ...config.reader_parts import MLP_TYPES, layer_kinds, mla_fields, noaux_tc_moe, rope_config, yarn_apply_mscale

_LAYER_TYPES = ("full_attention", "linear_attention")


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Ling's hybrid as transformers 5.24 builds it (BailingHybridForCausalLM): layer_types (every layer_group_size-th
    full) names each layer Kimi Delta Attention (num_attention_heads heads of head_dim, full-rank forget and output
    gates, the forget gate kda_lower_bound * sigmoid(exp(A_log) * x) when kda_safe_gate, the decay rounded to the
    model dtype) or MLA (interleaved rope, yarn's mscale in the softmax scale, a sigmoid gate per head on its output);
    mlp_layer_types a dense MLP or routed experts (sigmoid, noaux_tc in n_group groups with the correction bias,
    renormalised, scaled) beside n_shared_experts shared ones. Its MTP layers (layers num_hidden_layers and on) are
    the speculative drafter's only (mtp.py; transformers ignores them)."""
    layer_types = layer_kinds(hf, "layer_types", _LAYER_TYPES, c["num_layers"])
    mlp_types = layer_kinds(hf, "mlp_layer_types", MLP_TYPES, c["num_layers"])
    if getattr(hf, "mlp_bias", False):
        raise unsupported("mlp_bias", True, (False,), f" for {arch} (transformers' MLPs have no bias)")
    f = mla_fields(hf, c)
    nope, pe = f["qk_nope_head_dim"], f["qk_rope_head_dim"]
    mla = MLAConfig(**f, rope=rope_config(rope, c, pe, "interleaved"),
                    softmax_scale=float(yarn_apply_mscale(rope, (nope + pe) ** -0.5)), output_gate=True)
    H, K = int(hf.linear_num_heads), int(hf.linear_head_dim)
    kda = KimiDeltaConfig(H, H, K, K, int(hf.linear_conv_kernel_dim), forget_gate="full", output_gate="full",
                          gate_lower_bound=float(hf.kda_lower_bound) if hf.kda_safe_gate else None,
                          decay_in_model_dtype=True)
    return dict(num_kv_heads=c["num_heads"], attention=mla,
                layer_attention=tuple(mla if t == "full_attention" else kda for t in layer_types),
                **noaux_tc_moe(hf, c, int(hf.num_local_experts), mlp_types,
                               int(getattr(hf, "n_shared_experts", 0) or 0)))


__all__ = ["read"]
