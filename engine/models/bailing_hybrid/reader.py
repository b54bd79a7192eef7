"""Ling's hybrid config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ...config.layer_configs import MLAConfig, MoEConfig, unsupported
from ...config.linear_attention import KimiDeltaConfig
from ...config.reader_parts import rope_config

_LAYER_TYPES = ("full_attention", "linear_attention")
_MLP_TYPES = ("dense", "sparse")


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Ling's hybrid as transformers 5.24 builds it (BailingHybridForCausalLM): layer_types (every layer_group_size-th
    full) names each layer Kimi Delta Attention (num_attention_heads heads of head_dim, full-rank forget and output
    gates, the forget gate kda_lower_bound * sigmoid(exp(A_log) * x) when kda_safe_gate, the decay rounded to the
    model dtype) or MLA (interleaved rope, yarn's mscale in the softmax scale, a sigmoid gate per head on its output);
    mlp_layer_types a dense MLP or routed experts (sigmoid, noaux_tc in n_group groups with the correction bias,
    renormalised, scaled) beside n_shared_experts shared ones. Its MTP layers (layers num_hidden_layers and on) are
    not read (transformers ignores them too)."""
    from transformers.models.bailing_hybrid.modeling_bailing_hybrid import yarn_apply_mscale

    layers = c["num_layers"]
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    if len(layer_types) != layers or any(t not in _LAYER_TYPES for t in layer_types):
        raise unsupported("layer_types", list(layer_types), f"one of {', '.join(map(repr, _LAYER_TYPES))} for each of "
                                                            f"the num_hidden_layers={layers} layers")
    mlp_types = tuple(getattr(hf, "mlp_layer_types", None) or ())
    if len(mlp_types) != layers or any(t not in _MLP_TYPES for t in mlp_types):
        raise unsupported("mlp_layer_types", list(mlp_types), f"one of {', '.join(map(repr, _MLP_TYPES))} for each of "
                                                              f"the num_hidden_layers={layers} layers")
    if getattr(hf, "mlp_bias", False):
        raise unsupported("mlp_bias", True, (False,), f" for {arch} (transformers' MLPs have no bias)")
    nope, pe = int(hf.qk_nope_head_dim), int(hf.qk_rope_head_dim)
    q_lora = getattr(hf, "q_lora_rank", None)
    mla = MLAConfig(num_heads=c["num_heads"], q_lora_rank=int(q_lora) if q_lora is not None else None,
                    kv_lora_rank=int(hf.kv_lora_rank), qk_nope_head_dim=nope, qk_rope_head_dim=pe,
                    v_head_dim=int(hf.v_head_dim), rope=rope_config(rope, c, pe, "interleaved"),
                    softmax_scale=float(yarn_apply_mscale(rope, (nope + pe) ** -0.5)),
                    attention_bias=bool(getattr(hf, "attention_bias", False)), output_gate=True)
    H, K = int(hf.linear_num_heads), int(hf.linear_head_dim)
    kda = KimiDeltaConfig(H, H, K, K, int(hf.linear_conv_kernel_dim), forget_gate="full", output_gate="full",
                          gate_lower_bound=float(hf.kda_lower_bound) if hf.kda_safe_gate else None,
                          decay_in_model_dtype=True)
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
