"""AFMoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, MAX_WIDTH, gqa, layer_kinds, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """AFMoE as transformers 5.24 builds it (AfmoeForCausalLM): GQA whose q and k are RMS-normed per head, rotated
    on the sliding_attention layers only (the full_attention ones are NoPE, GQAConfig.nope_layers), the sliding ones
    attending to their last sliding_window keys; the attention output times sigmoid(gate_proj(x)) before o_proj
    (GQAConfig.output_gate); the first num_dense_layers layers a dense MLP of intermediate_size, the others routed:
    sigmoid scores, the top-k of scores + expert_bias, the unbiased scores renormalised, times route_scale
    (DeepSeek-V3's noaux_tc in one group), beside a shared MLP moe_intermediate_size * num_shared_experts wide (0:
    none). mup_enabled scales the embeddings by sqrt(hidden_size) (the embedding kind "afmoe"). attention_bias is
    refused: transformers' gate_proj has none, and the q rows it shares a stack with would."""
    layers = c["num_layers"]
    layer_types = layer_kinds(hf, "layer_types", LAYER_TYPES, layers)
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    window = getattr(hf, "sliding_window", None) if sliding else None
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer: layer_types names sliding_attention layers")
    if getattr(hf, "attention_bias", False):
        raise unsupported("attention_bias", True, (False,), " for AFMoE (its q rows share a stack with the unbiased "
                                                            "gate_proj)")
    E = getattr(hf, "num_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("num_experts", E, "a positive integer")
    dense = getattr(hf, "num_dense_layers", 0) or 0
    if isinstance(dense, bool) or not isinstance(dense, int) or not 0 <= dense < layers:
        raise unsupported("num_dense_layers", dense, f"an integer in [0, num_hidden_layers={layers})")
    shared = getattr(hf, "num_shared_experts", 0) or 0
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= MAX_WIDTH:
        raise unsupported("num_shared_experts", shared, "an integer >= 0")
    scale = getattr(hf, "route_scale", None)
    scale = 1.0 if scale is None else scale
    router = RouterConfig(E, c["top_k"], "sigmoid", "noaux_tc", 1, 1, True, scale)
    moe = MoEConfig(router, shared, first_k_dense_replace=dense)
    full = tuple(i for i in range(layers) if i not in sliding)
    attention = gqa(c, rope_config(rope, c, c["head_dim"]), qk_norm="per_head", output_gate=True,
                    sliding_window=window, sliding_layers=sliding, nope_layers=full)
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=True,
                sparse_layers=tuple(range(dense, layers)), moe=moe, attention=attention)


__all__ = ["read"]
