"""EXAONE-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, MLP_TYPES, gqa, layer_kinds, noaux_tc_moe, rope_config


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
    layer_types = layer_kinds(hf, "layer_types", LAYER_TYPES, layers)
    mlp_types = layer_kinds(hf, "mlp_layer_types", MLP_TYPES, layers)
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
    return dict(**noaux_tc_moe(hf, c, int(hf.num_experts), mlp_types, shared),
                attention=gqa(c, rope_config(rope, c, c["head_dim"]), qk_norm="per_head",
                              sliding_window=window if sliding else None, sliding_layers=sliding,
                              nope_layers=nope))


__all__ = ["read"]
