"""EXAONE-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ...config.layer_configs import MoEConfig, unsupported
from ...config.reader_parts import LAYER_TYPES, gqa, rope_config

_MLP_TYPES = ("dense", "sparse")


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """EXAONE-MoE, as transformers 5.24 builds it (ExaoneMoeForCausalLM): every layer GQA with q and k RMS-normed
    per head before rotary; layer_types names each layer sliding_attention (a window of sliding_window keys,
    rotary over the whole head) or full_attention, which has no rotary at all when the model has sliding layers
    ("global NoPE"; with sliding_window null every layer is full and rotates); mlp_layer_types a dense MLP of
    intermediate_size or routed experts (DeepSeek-V3's noaux_tc: sigmoid scores in float32, the top-k of scores +
    e_score_correction_bias within the topk_group best of n_group groups, the unbiased weights renormalised when
    norm_topk_prob and scaled by routed_scaling_factor) beside one shared MLP num_shared_experts x
    moe_intermediate_size wide. transformers' model has no q/k/v/o biases and no MLP biases."""
    layers = c["num_layers"]
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    if len(layer_types) != layers or any(t not in LAYER_TYPES for t in layer_types):
        raise unsupported("layer_types", list(layer_types), f"one of {', '.join(map(repr, LAYER_TYPES))} for each "
                                                            f"of the num_hidden_layers={layers} layers")
    mlp_types = tuple(getattr(hf, "mlp_layer_types", None) or ())
    if len(mlp_types) != layers or any(t not in _MLP_TYPES for t in mlp_types):
        raise unsupported("mlp_layer_types", list(mlp_types), f"one of {', '.join(map(repr, _MLP_TYPES))} for each "
                                                              f"of the num_hidden_layers={layers} layers")
    window = getattr(hf, "sliding_window", None)
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise unsupported("sliding_window", window, "null or a positive integer")
    if window is None:
        # transformers masks no layer by a window then (and rotates every layer), whatever layer_types says.
        sliding = ()
    # transformers: `if self.sliding_window is None or self.is_sliding: apply_rotary_pos_emb`.
    nope = () if window is None else tuple(i for i in range(layers) if i not in sliding)
    for name in ("attention_bias", "mlp_bias"):
        if getattr(hf, name, False):
            raise unsupported(name, True, (False,), f" for {arch} (transformers' model has no such biases)")
    shared = int(getattr(hf, "num_shared_experts", 0) or 0)
    if shared < 0:
        raise unsupported("num_shared_experts", shared, "an integer >= 0")
    E = int(hf.num_experts)
    n_group, topk_group = int(hf.n_group or 1), int(hf.topk_group or 1)
    norm = bool(hf.norm_topk_prob)
    router = RouterConfig(E, c["top_k"], "sigmoid", "noaux_tc", n_group, topk_group, norm,
                          float(hf.routed_scaling_factor if hf.routed_scaling_factor is not None else 1.0),
                          float32_logits=True)  # transformers casts the router's input and weight to float32
    sparse = tuple(i for i, t in enumerate(mlp_types) if t == "sparse")
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm, sparse_layers=sparse,
                moe=MoEConfig(router, shared),
                attention=gqa(c, rope_config(rope, c, c["head_dim"]), qk_norm="per_head",
                              sliding_window=window if sliding else None, sliding_layers=sliding,
                              nope_layers=nope))


__all__ = ["read"]
