"""Gemma 4's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import math

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ..gqa_config import GQAConfig
from ..rope_config import RopeConfig
from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, MAX_WIDTH, layer_kinds, rotary_dim

ACTIVATION = "gelu_pytorch_tanh"


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Gemma 4's MoE text model as transformers 5.24 builds it (Gemma4ForCausalLM, Gemma4TextConfig):
    - attention: GQA, one config per layer (ModelConfig.layer_attention). layer_types' sliding_attention layers see
      the last sliding_window keys, head_dim wide, num_key_value_heads kv heads, rope_parameters.sliding_attention;
      full_attention layers the whole context, per_layer_config's head_dim (global_head_dim) and kv heads
      (num_global_key_value_heads under attention_k_eq_v, whose values are k_proj's output: value_from_key),
      rope_parameters.full_attention ("proportional": partial_rotary_factor of the head's frequencies turn). Every
      layer: q and k RMS-normed per head with weights, v without (v_norm), softmax scale 1, biases when
      attention_bias.
    - FFN (enable_moe_block, every layer): a dense MLP intermediate_size wide beside top_k_experts of num_experts
      experts moe_intermediate_size wide, both GELU-tanh-gated (hidden_activation gelu_pytorch_tanh); softmax
      routing in float32, the top-k renormalised, times the router's per-expert scale (kinds.py).
    - the final logits softcapped by final_logit_softcapping (the head kind), the embedding scaled by sqrt(hidden).
    Refused, naming the field: enable_moe_block false (the dense Gemma 4 models have no experts), per-layer inputs
    (hidden_size_per_layer_input > 0: the E2B / E4B models), num_kv_shared_layers > 0, use_bidirectional_attention
    "all", a hidden_activation other than gelu_pytorch_tanh, any quantization_config."""
    layers = c["num_layers"]
    if c["quantization"] is not None:
        raise unsupported("quantization_config", getattr(c["quantization"], "method", c["quantization"]), "none",
                          f" for {arch} yet")
    if not bool(getattr(hf, "enable_moe_block", False)):
        raise unsupported("enable_moe_block", getattr(hf, "enable_moe_block", None), (True,),
                          " (a dense Gemma 4 model has no experts: moelink serves MoE models)")
    for name in ("hidden_size_per_layer_input", "num_kv_shared_layers"):
        v = getattr(hf, name, 0) or 0
        if v:
            raise unsupported(name, v, (0,), f" for {arch} yet (per-layer inputs and shared KV layers are the "
                                             f"E2B / E4B models')")
    bidirectional = getattr(hf, "use_bidirectional_attention", None)
    if bidirectional not in (None, "vision"):  # "vision": image tokens only; text is causal either way
        raise unsupported("use_bidirectional_attention", bidirectional, (None, "vision"))
    act = getattr(hf, "hidden_activation", ACTIVATION)
    if act != ACTIVATION:
        raise unsupported("hidden_activation", act, (ACTIVATION,), f" for {arch}")
    layer_types = layer_kinds(hf, "layer_types", LAYER_TYPES, layers)
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    window = getattr(hf, "sliding_window", None) if sliding else None
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer: layer_types names sliding_attention layers")
    if not set(layer_types) <= set(rope) or not all(isinstance(rope[k], dict) for k in set(layer_types)):
        raise unsupported("rope_parameters", sorted(rope), f"one rope per layer type "
                                                           f"({', '.join(sorted(set(layer_types)))})")
    k_eq_v = bool(getattr(hf, "attention_k_eq_v", False))
    bias = bool(getattr(hf, "attention_bias", False))
    per_layer = getattr(hf, "per_layer_config", None)
    N = c["num_heads"]

    def attention(i: int, kind: str) -> GQAConfig:
        own = per_layer[i] if per_layer is not None else None
        H = int(getattr(own, "head_dim", None) or c["head_dim"])
        K = int(getattr(own, "num_key_value_heads", None) or c["num_kv_heads"])
        params = rope[kind]
        if params["rope_type"] == "proportional":  # a head_dim-wide table whose last frequencies are 0
            factor = params.get("partial_rotary_factor", 1.0)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
                raise unsupported(f"rope_parameters.{kind}.partial_rotary_factor", factor, "a number in (0, 1]")
            r = H
        else:
            r = rotary_dim(H, params.get("partial_rotary_factor", 1.0),
                           f"rope_parameters.{kind}.partial_rotary_factor")
        theta = params.get("rope_theta")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (math.isfinite(theta) and theta > 0):
            raise unsupported(f"rope_parameters.{kind}.rope_theta", theta, "a finite number > 0")
        full = kind == "full_attention"
        return GQAConfig(N, K, H, RopeConfig(r, float(theta), params["rope_type"], "neox", kind), qk_norm="per_head",
                         qkv_bias=bias, o_bias=bias, sliding_window=window, sliding_layers=sliding, scale=1.0,
                         v_norm=True, value_from_key=k_eq_v and full)

    by_layer = tuple(attention(i, t) for i, t in enumerate(layer_types))
    E, K_top = getattr(hf, "num_experts", None), getattr(hf, "top_k_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("num_experts", E, "a positive integer (enable_moe_block)")
    if isinstance(K_top, bool) or not isinstance(K_top, int) or not 1 <= K_top <= E:
        raise unsupported("top_k_experts", K_top, f"an integer in [1, num_experts={E}]")
    for name in ("moe_intermediate_size", "intermediate_size"):
        v = getattr(hf, name, None)
        if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_WIDTH:
            raise unsupported(name, v, f"an integer in [1, {MAX_WIDTH}]")
    cap = getattr(hf, "final_logit_softcapping", None)
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                            or not (math.isfinite(cap) and cap > 0)):
        raise unsupported("final_logit_softcapping", cap, "null or a finite number > 0")
    router = RouterConfig(E, K_top, norm_topk_prob=True)
    moe = MoEConfig(router, activation="gelu_tanh", dense_activation="gelu_tanh")
    full = next((a for a, t in zip(by_layer, layer_types) if t == "full_attention"), by_layer[0])
    return dict(num_experts=E, top_k=K_top, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=True, sparse_layers=tuple(range(layers)),
                moe=moe, attention=full, layer_attention=by_layer, rope_theta=full.rope.theta)


__all__ = ["ACTIVATION", "read"]
