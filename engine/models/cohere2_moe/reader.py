"""Cohere2-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

import math

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, MAX_WIDTH, MLP_TYPES, gqa, layer_kinds, rope_config

SELECTION_FNS = ("softmax", "sigmoid")
COMBINATIONS = ("sum", "average")


def _positive(name: str, v, most: float = math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 < v < most):
        raise unsupported(name, v, "a finite number > 0" + (f" and < {most}" if most < math.inf else ""))
    return float(v)


def _width(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_WIDTH:
        raise unsupported(name, v, f"an integer in [1, {MAX_WIDTH}]")
    return v


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """Cohere2-MoE as transformers 5.24 builds it (Cohere2MoeForCausalLM): every layer parallel, x + attn(h) +
    mlp(h) with h = norm(x), one norm per layer (RMSNorm with rms_norm_eps where config.json gives one, else
    Cohere's LayerNorm without bias, layer_norm_eps, in float32; the final norm the same); GQA with biases where
    attention_bias; layer_types' sliding_attention layers see the last sliding_window keys and rotate q/k with
    Cohere's interleaved rope, the full_attention layers rotate nothing (NoPE) unless the layer is a dense prefix one
    and prefix_dense_sliding_window_pattern is 1 (transformers' force_rope); mlp_layer_types' dense layers a SiLU MLP
    of prefix_dense_intermediate_size, the sparse ones the top-k of the router's logits weighted by a softmax over
    those k (expert_selection_fn softmax) or by their sigmoids (sigmoid; norm_topk_prob renormalising them is not
    built), experts of intermediate_size, plus num_shared_experts' one MLP of num_shared_experts * intermediate_size
    summed with the routed output or averaged with it (shared_expert_combination_strategy); logits times
    logit_scale (kinds.py folds it, and the average's halves, into the weights). Float checkpoints only
    (quantization_config refused naming it)."""
    q = c["quantization"]
    if q is not None:
        raise unsupported("quantization_config", getattr(q, "method", q), "none",
                          f" for {arch} (its logit_scale and shared-expert average fold into float weights)")
    n = c["num_layers"]
    kinds = layer_kinds(hf, "layer_types", LAYER_TYPES, n)
    mlp = layer_kinds(hf, "mlp_layer_types", MLP_TYPES, n)
    sparse = tuple(i for i, t in enumerate(mlp) if t == "sparse")
    if not sparse:
        raise unsupported("mlp_layer_types", list(mlp), "at least one 'sparse' layer")
    sliding = tuple(i for i, t in enumerate(kinds) if t == "sliding_attention")
    window = getattr(hf, "sliding_window", None) if sliding else None
    if sliding and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer: layer_types names sliding_attention layers")
    pattern = getattr(hf, "prefix_dense_sliding_window_pattern", 1)
    nope = tuple(i for i, t in enumerate(kinds) if t == "full_attention" and not (mlp[i] == "dense" and pattern == 1))
    E = getattr(hf, "num_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("num_experts", E, "a positive integer")
    fn = getattr(hf, "expert_selection_fn", "softmax")
    if fn not in SELECTION_FNS:
        raise unsupported("expert_selection_fn", fn, SELECTION_FNS)
    if fn == "sigmoid" and getattr(hf, "norm_topk_prob", True):
        raise unsupported("norm_topk_prob", True, (False,), " with expert_selection_fn='sigmoid' (the renormalised "
                                                            "sigmoid weights are not built)")
    router = (RouterConfig(E, c["top_k"], "softmax", "topk_softmax", norm_topk_prob=True) if fn == "softmax"
              else RouterConfig(E, c["top_k"], "sigmoid", "topk_sigmoid", norm_topk_prob=False))
    inter = _width("intermediate_size", getattr(hf, "intermediate_size", None))
    shared = getattr(hf, "num_shared_experts", 0) or 0
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= MAX_WIDTH // inter:
        raise unsupported("num_shared_experts", shared, f"an integer in [0, {MAX_WIDTH // inter}]")
    combine = getattr(hf, "shared_expert_combination_strategy", "average")
    if shared and combine not in COMBINATIONS:
        raise unsupported("shared_expert_combination_strategy", combine, COMBINATIONS)
    dense = (_width("prefix_dense_intermediate_size", getattr(hf, "prefix_dense_intermediate_size", None))
             if len(sparse) < n else 0)
    _positive("logit_scale", getattr(hf, "logit_scale", 1.0))
    rms = getattr(hf, "rms_norm_eps", None)
    eps = _positive("layer_norm_eps", getattr(hf, "layer_norm_eps", 1e-5), 1.0) if rms is None else c["rms_norm_eps"]
    bias = bool(getattr(hf, "attention_bias", False))
    attention = gqa(c, rope_config(rope, c, c["head_dim"], style="interleaved"), qkv_bias=bias, o_bias=bias,
                    sliding_window=window, sliding_layers=sliding, nope_layers=nope)
    moe = MoEConfig(router, n_shared_experts=1 if shared else 0, shared_expert_intermediate_size=shared * inter)
    return dict(rms_norm_eps=eps, num_experts=E, moe_intermediate_size=inter, intermediate_size=dense,
                norm_topk_prob=fn == "softmax", sparse_layers=sparse, moe=moe, attention=attention)


__all__ = ["COMBINATIONS", "SELECTION_FNS", "read"]
