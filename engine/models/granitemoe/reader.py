"""Granite-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import math

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import MAX_WIDTH, gqa, layer_kinds, rope_config
from ..mamba2_config import Mamba2Config

# The muP multipliers transformers' model applies (kinds.py folds all but attention_multiplier into the weights).
MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier")


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Granite-MoE as transformers 5.24 builds it (Granite 4.0-H, GraniteMoeHybridForCausalLM: `_hybrid`) (GraniteMoeForCausalLM, GraniteMoeSharedForCausalLM): every layer
    GQA (biases on q/k/v/o when attention_bias) whose softmax scale is attention_multiplier, not head_dim ** -0.5;
    every layer routed: the top-k of the router's logits, softmax over those k (gpt-oss's "topk_softmax"), experts
    of intermediate_size, plus (the Shared model) one shared MLP of shared_intermediate_size; the embeddings times
    embedding_multiplier, each block's output times residual_multiplier before the residual add, the logits divided
    by logits_scaling. Float checkpoints only: the multipliers are folded into the weights at load."""
    values = {}
    for name in MULTIPLIERS:
        v = getattr(hf, name, 1.0)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise unsupported(name, v, "a finite number > 0")
        values[name] = float(v)
    q = c["quantization"]
    if q is not None:
        raise unsupported("quantization_config", getattr(q, "method", q), "none",
                          f" for {arch} (its muP multipliers are folded into float weights)")
    if arch == "GraniteMoeHybridForCausalLM":
        return _hybrid(arch, hf, c, rope, values)
    shared = int(getattr(hf, "shared_intermediate_size", 0) or 0) if arch == "GraniteMoeSharedForCausalLM" else 0
    if not 0 <= shared <= MAX_WIDTH:
        raise unsupported("shared_intermediate_size", shared, f"an integer in [0, {MAX_WIDTH}] (0: no shared MLP)")
    E, inter, bias = int(hf.num_local_experts), int(hf.intermediate_size), bool(getattr(hf, "attention_bias", False))
    router = RouterConfig(E, c["top_k"], "softmax", "topk_softmax", norm_topk_prob=True)
    return dict(num_experts=E, moe_intermediate_size=inter, intermediate_size=inter, norm_topk_prob=True,
                sparse_layers=tuple(range(c["num_layers"])),
                moe=MoEConfig(router, n_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared),
                attention=gqa(c, rope_config(rope, c, c["head_dim"]), qkv_bias=bias, o_bias=bias,
                              scale=values["attention_multiplier"]))


# position_embedding_type: transformers rotates only under "rope"; Granite 4.0-H's configs say "nope".
POSITION_TYPES = (None, "nope", "rope")


def _hybrid(arch: str, hf, c: dict, rope: dict, values: dict) -> dict:
    """Granite 4.0-H (GraniteMoeHybridForCausalLM, transformers 5.24): layer_types says which layers are Mamba2
    ("linear_attention", published "mamba": engine/models/mamba2.py) and which GQA ("full_attention", published
    "attention"; rotary only where position_embedding_type is "rope", else none at all); every layer's FFN is the
    routed experts plus the shared MLP (shared_intermediate_size, always built by transformers: 0 adds nothing);
    the muP multipliers as Granite-MoE's."""
    n = c["num_layers"]
    kinds = layer_kinds(hf, "layer_types", ("linear_attention", "full_attention"), n)
    if "full_attention" not in kinds:
        raise unsupported("layer_types", list(kinds), "at least one 'full_attention' (attention) layer")
    pos = getattr(hf, "position_embedding_type", None)
    if pos not in POSITION_TYPES:
        raise unsupported("position_embedding_type", pos, POSITION_TYPES)
    E = int(getattr(hf, "num_local_experts", 0) or 0)
    if E < 1:
        raise unsupported("num_local_experts", E, "an integer >= 1", f" for {arch} (its dense form, the shared MLP "
                                                                      "alone, is not built yet)")
    shared = int(getattr(hf, "shared_intermediate_size", 0) or 0)
    if not 0 <= shared <= MAX_WIDTH:
        raise unsupported("shared_intermediate_size", shared, f"an integer in [0, {MAX_WIDTH}] (0: no shared MLP)")
    if getattr(hf, "mamba_proj_bias", False):
        raise unsupported("mamba_proj_bias", True, (False,), f" for {arch}")
    heads, head_dim = getattr(hf, "mamba_n_heads", None), getattr(hf, "mamba_d_head", None)
    expand = getattr(hf, "mamba_expand", None)
    if isinstance(heads, int) and isinstance(head_dim, int) and heads * head_dim != (expand or 0) * c["hidden_size"]:
        raise unsupported("mamba_d_head", head_dim, f"mamba_expand * hidden_size / mamba_n_heads = {expand} * "
                                                    f"{c['hidden_size']} / {heads}")
    limit = getattr(hf, "time_step_limit", None) or (0.0, math.inf)
    if not isinstance(limit, (tuple, list)) or len(limit) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in limit):
        raise unsupported("time_step_limit", limit, "two numbers [lo, hi] with 0 <= lo <= hi")
    # Mamba2Config checks each mamba_* field (and time_step_limit's order) with a sentence naming it.
    mamba = Mamba2Config(heads, head_dim, getattr(hf, "mamba_n_groups", None), getattr(hf, "mamba_d_state", None),
                         getattr(hf, "mamba_d_conv", None), conv_bias=bool(getattr(hf, "mamba_conv_bias", True)),
                         dt_min=float(limit[0]), dt_max=float(limit[1]), norm_eps=float(c["rms_norm_eps"]))
    bias = bool(getattr(hf, "attention_bias", False))
    nope = () if pos == "rope" else tuple(range(n))
    full = gqa(c, rope_config(rope, c, c["head_dim"]), qkv_bias=bias, o_bias=bias,
               scale=values["attention_multiplier"], nope_layers=nope)
    router = RouterConfig(E, c["top_k"], "softmax", "topk_softmax", norm_topk_prob=True)
    return dict(num_experts=E, moe_intermediate_size=int(hf.intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=True, sparse_layers=tuple(range(n)),
                moe=MoEConfig(router, n_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared),
                attention=full, layer_attention=tuple(mamba if k == "linear_attention" else full for k in kinds))


__all__ = ["MULTIPLIERS", "POSITION_TYPES", "read"]
