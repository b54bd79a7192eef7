"""Qwen2-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, MAX_WIDTH, gqa, layer_kinds, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Qwen2-MoE as transformers 5.24 builds it (Qwen2MoeForCausalLM): GQA with biases on q/k/v (`qkv_bias`, none on
    o_proj), rotary over the whole head, no q/k norm; `layer_types` may make some layers sliding-window
    (use_sliding_window: the odd layers below max_window_layers); a layer is routed unless mlp_only_layers names it
    or (i + 1) % decoder_sparse_step != 0, else a dense MLP of intermediate_size. A routed layer: softmax top-k
    (in float32), renormalised only when norm_topk_prob (False in the published configs), plus one shared MLP of
    shared_expert_intermediate_size scaled per token by sigmoid(shared_expert_gate(x))."""
    layers = c["num_layers"]
    layer_types = layer_kinds(hf, "layer_types", LAYER_TYPES, layers)
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    window = getattr(hf, "sliding_window", None) if sliding else None
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer: layer_types names sliding_attention layers")
    E = int(hf.num_experts)
    only_dense = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise unsupported("decoder_sparse_step", step, "an integer >= 1")
    sparse = tuple(i for i in range(layers) if i not in only_dense and E > 0 and (i + 1) % step == 0)
    if not sparse:
        raise unsupported("num_experts", E, "a positive integer with at least one routed layer (mlp_only_layers, "
                                            "decoder_sparse_step leave none)")
    if len(sparse) < layers and not getattr(hf, "intermediate_size", None):
        raise unsupported("intermediate_size", getattr(hf, "intermediate_size", None),
                          "a positive integer (mlp_only_layers / decoder_sparse_step leave dense layers)")
    # transformers always builds the shared MLP and its gate; at width 0 the MLP adds exactly 0 to every token, so 0
    # reads as no shared expert (as Qwen3-Next's reader does).
    shared = getattr(hf, "shared_expert_intermediate_size", 0)
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= MAX_WIDTH:
        raise unsupported("shared_expert_intermediate_size", shared, f"an integer in [0, {MAX_WIDTH}] (0: no "
                                                                     f"shared expert)")
    norm = bool(hf.norm_topk_prob)
    moe = MoEConfig(RouterConfig(E, c["top_k"], norm_topk_prob=norm), n_shared_experts=1 if shared else 0,
                    shared_expert_intermediate_size=shared, shared_expert_gate=bool(shared))
    attention = gqa(c, rope_config(rope, c, c["head_dim"]), qkv_bias=bool(getattr(hf, "qkv_bias", True)),
                    sliding_window=window, sliding_layers=sliding)
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(getattr(hf, "intermediate_size", 0) or 0), norm_topk_prob=norm,
                sparse_layers=sparse, moe=moe, attention=attention)


__all__ = ["read"]
