"""Flint's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, MAX_WIDTH, gqa, layer_kinds, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Flint as transformers 5.24 builds it (FlintForCausalLM): GQA whose q and k are RMS-normed per head, rotated on
    the sliding_attention layers only (the full_attention ones are NoPE), the sliding ones attending to their last
    sliding_window keys, a learned logit per head in every softmax's denominator (sinks), attention_bias on q/k/v
    and o_proj alike; a layer is routed unless mlp_only_layers names it or (i + 1) % decoder_sparse_step != 0, else a
    dense MLP of intermediate_size. A routed layer: the top-k of the float32 router's sigmoid scores, renormalised
    when norm_topk_prob (RouterConfig topk_method "topk_sigmoid"), plus an ungated shared MLP of
    shared_expert_intermediate_size (0: none)."""
    layers = c["num_layers"]
    layer_types = layer_kinds(hf, "layer_types", LAYER_TYPES, layers)
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    window = getattr(hf, "sliding_window", None) if sliding else None
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer: layer_types names sliding_attention layers")
    E = getattr(hf, "num_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("num_experts", E, "a positive integer")
    only_dense = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise unsupported("decoder_sparse_step", step, "an integer >= 1")
    sparse = tuple(i for i in range(layers) if i not in only_dense and (i + 1) % step == 0)
    if not sparse:
        raise unsupported("mlp_only_layers", sorted(only_dense), "a list that leaves at least one routed layer")
    shared = getattr(hf, "shared_expert_intermediate_size", 0) or 0
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= MAX_WIDTH:
        raise unsupported("shared_expert_intermediate_size", shared, f"an integer in [0, {MAX_WIDTH}] (0: no "
                                                                     f"shared expert)")
    norm = bool(hf.norm_topk_prob)
    router = RouterConfig(E, c["top_k"], "sigmoid", "topk_sigmoid", norm_topk_prob=norm, float32_logits=True)
    moe = MoEConfig(router, n_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared)
    bias = bool(getattr(hf, "attention_bias", False))
    full = tuple(i for i in range(layers) if i not in sliding)
    attention = gqa(c, rope_config(rope, c, c["head_dim"]), qk_norm="per_head", qkv_bias=bias, o_bias=bias,
                    sinks=True, sliding_window=window, sliding_layers=sliding, nope_layers=full)
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm, sparse_layers=sparse, moe=moe,
                attention=attention)


__all__ = ["read"]
