"""gpt-oss's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, gqa, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """gpt-oss: GQA with q/k/v/o biases (attention_bias), per-head attention sinks, a sliding window on the
    layers layer_types names "sliding_attention"; every layer routed (router with a bias, top-k then softmax
    over the k), experts with biases and the clamped SwiGLU; YaRN rope over the whole head (neox pairs;
    `truncate` is read by transformers' own yarn, which computes the table)."""
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    if len(layer_types) != c["num_layers"] or any(t not in LAYER_TYPES for t in layer_types):
        raise unsupported("layer_types", list(layer_types), f"one of {', '.join(map(repr, LAYER_TYPES))} for each "
                                                            f"of the num_hidden_layers={c['num_layers']} layers")
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    window = getattr(hf, "sliding_window", None)
    if sliding and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer (layer_types has sliding_attention layers)")
    E, inter = int(hf.num_local_experts), int(hf.intermediate_size)
    router = RouterConfig(E, c["top_k"], topk_method="topk_softmax", norm_topk_prob=True)
    bias = bool(getattr(hf, "attention_bias", True))
    return dict(num_experts=E, moe_intermediate_size=inter, intermediate_size=inter, norm_topk_prob=True,
                sparse_layers=tuple(range(c["num_layers"])),
                moe=MoEConfig(router, router_bias=True, expert_bias=True, activation="swiglu_oai",
                              swiglu_alpha=hf.swiglu_alpha, swiglu_limit=hf.swiglu_limit),
                attention=gqa(c, rope_config(rope, c, c["head_dim"]), qkv_bias=bias, o_bias=bias, sinks=True,
                               sliding_window=window if sliding else None, sliding_layers=sliding))



__all__ = ["read"]
