"""LFM2-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import MAX_WIDTH, gqa, layer_kinds, rope_config
from ..short_conv_config import ShortConvConfig

LFM2_LAYER_TYPES = ("conv", "full_attention")


def _width(hf, name: str) -> int:
    v = getattr(hf, name, None)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_WIDTH:
        raise unsupported(name, v, f"an integer in [1, {MAX_WIDTH}]")
    return v


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """LFM2-MoE as transformers 5.24 builds it (Lfm2MoeForCausalLM): layer_types says which layers are gated short
    convolutions ("conv": in_proj -> B, C, x; C * causal_conv(B * x); out_proj, engine/models/short_conv.py) and
    which GQA ("full_attention": rotary over the whole head, q/k RMSNorm per head, no biases); every norm RMSNorm
    with norm_eps; the first num_dense_layers layers a dense SiLU MLP of intermediate_size, the rest routed: the
    router's logits in the model dtype, sigmoid scores, the top-k of scores + expert_bias (use_expert_bias), the
    unbiased scores of those renormalised when norm_topk_prob, times routed_scaling_factor; experts of
    moe_intermediate_size; the final norm after the last layer (embedding_norm). Float checkpoints only
    (quantization_config refused naming it)."""
    q = c["quantization"]
    if q is not None:  # LiquidAI publishes bf16; no quantized format of the short conv is tested
        raise unsupported("quantization_config", getattr(q, "method", q), "none", f" for {arch} (float checkpoints)")
    n = c["num_layers"]
    kinds = layer_kinds(hf, "layer_types", LFM2_LAYER_TYPES, n)
    if "full_attention" not in kinds:
        raise unsupported("layer_types", list(kinds), "at least one 'full_attention' layer")
    dense = getattr(hf, "num_dense_layers", 0)
    if isinstance(dense, bool) or not isinstance(dense, int) or not 0 <= dense < n:
        raise unsupported("num_dense_layers", dense, f"an integer in [0, num_hidden_layers={n}) (at least one "
                                                     f"routed layer)")
    E = getattr(hf, "num_experts", None)
    if isinstance(E, bool) or not isinstance(E, int) or E < 1:
        raise unsupported("num_experts", E, "a positive integer")
    eps = getattr(hf, "norm_eps", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise unsupported("norm_eps", eps, "a number in (0, 1)")
    L = getattr(hf, "conv_L_cache", 3)
    if isinstance(L, bool) or not isinstance(L, int):
        raise unsupported("conv_L_cache", L, "an integer >= 2")
    conv = ShortConvConfig(c["hidden_size"], L, bias=bool(getattr(hf, "conv_bias", False)))
    scale = getattr(hf, "routed_scaling_factor", 1.0)
    norm = bool(getattr(hf, "norm_topk_prob", True))
    # noaux_tc over one group: selection on sigmoid + bias (a zero bias without use_expert_bias: kinds.py fills
    # none from the checkpoint), the unbiased scores as weights. transformers' renormalisation adds 1e-6 to the sum
    # where moelink's adds 1e-20 (a relative 5e-7 on the weights of top-k sigmoid scores summing near 2).
    router = RouterConfig(E, c["top_k"], "sigmoid", "noaux_tc", 1, 1, norm,
                          float(scale) if scale is not None else 1.0, float32_logits=False)
    attention = gqa(c, rope_config(rope, c, c["head_dim"]), qk_norm="per_head")
    return dict(rms_norm_eps=float(eps), num_experts=E, moe_intermediate_size=_width(hf, "moe_intermediate_size"),
                intermediate_size=_width(hf, "intermediate_size") if dense else int(hf.intermediate_size or 0),
                norm_topk_prob=norm, sparse_layers=tuple(range(dense, n)), moe=MoEConfig(router),
                attention=attention, layer_attention=tuple(conv if k == "conv" else attention for k in kinds))


__all__ = ["LFM2_LAYER_TYPES", "read"]
