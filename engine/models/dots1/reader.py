"""dots.llm1's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from dataclasses import replace

from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, MAX_WIDTH, gqa, layer_kinds, noaux_tc_moe, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """dots.llm1 as transformers 5.24 builds it (Dots1ForCausalLM): Qwen3's attention (per-head q/k RMSNorm before a
    rotary over the whole head, attention_bias on q/k/v and o_proj alike, a sliding window on the layers
    layer_types calls sliding_attention) and DeepSeek-V3's MoE block: sigmoid scores of the float32 router, the
    top-k of scores + e_score_correction_bias within the topk_group best of n_group groups, renormalised when
    norm_topk_prob, times routed_scaling_factor, beside n_shared_experts shared experts (one MLP
    moe_intermediate_size * n_shared_experts wide; 0: none); the first first_k_dense_replace layers a dense MLP of
    intermediate_size."""
    layers = c["num_layers"]
    layer_types = layer_kinds(hf, "layer_types", LAYER_TYPES, layers)
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    window = getattr(hf, "sliding_window", None) if sliding else None
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer: layer_types names sliding_attention layers")
    E = getattr(hf, "n_routed_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("n_routed_experts", E, "a positive integer")
    shared = getattr(hf, "n_shared_experts", None)
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= MAX_WIDTH:
        raise unsupported("n_shared_experts", shared, "an integer >= 0 (transformers sizes the shared MLP by it)")
    first = getattr(hf, "first_k_dense_replace", 0)
    if isinstance(first, bool) or not isinstance(first, int) or not 0 <= first < layers:
        raise unsupported("first_k_dense_replace", first, f"an integer in [0, num_hidden_layers={layers})")
    bias = bool(getattr(hf, "attention_bias", False))
    fields = noaux_tc_moe(hf, c, E, tuple("dense" if i < first else "sparse" for i in range(layers)), shared)
    fields["moe"] = replace(fields["moe"], first_k_dense_replace=first)  # the leading dense layers (MTP's rule)
    return dict(fields, attention=gqa(c, rope_config(rope, c, c["head_dim"]), qk_norm="per_head", qkv_bias=bias,
                                      o_bias=bias, sliding_window=window, sliding_layers=sliding))


__all__ = ["read"]
