"""Nemotron-H's config reader, and the pairing of its single-block checkpoint layers into engine layers.

config.json, as transformers 5.24's NemotronHConfig reads it (hybrid_override_pattern turned into layers_block_type),
onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read` after the common fields); a value
moelink cannot run is refused naming the field.

Pairing: transformers' NemotronHBlock k is x + mixer_k(norm_k(x)), one block each ("linear_attention": Mamba2,
"full_attention": GQA without rotary, "moe": the routed experts with the shared expert, "mlp": a relu^2 MLP). A
token mixer followed by an FFN layer is exactly the prenorm layer (norm_k before the mixer, norm_{k+1} before the
FFN), so engine layer j is one mixer layer and, where the next checkpoint layer is an FFN layer, that one too; a
mixer followed by a mixer (Nemotron 3's "M*") is an engine layer without an FFN. An FFN layer with no mixer right
before it (a pattern starting with "E", or "EE") is refused, naming layers_block_type.
"""
from __future__ import annotations

import math

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import MAX_WIDTH, gqa, rope_config
from ..mamba2_config import MAMBA2_BOUNDS, Mamba2Config

MIXERS = ("linear_attention", "full_attention")
FFNS = ("moe", "mlp")
# Nemotron-H's Mamba2 fields, each checked under its own name before Mamba2Config (whose messages name Granite's).
_MAMBA_FIELDS = (("mamba_num_heads", "mamba_n_heads"), ("mamba_head_dim", "mamba_d_head"), ("n_groups", "mamba_n_groups"),
                 ("ssm_state_size", "mamba_d_state"), ("conv_kernel", "mamba_d_conv"))


def layer_pairs(kinds) -> tuple[tuple[int, int | None], ...]:
    """(mixer layer, FFN layer or None) per engine layer, from the checkpoint's layers_block_type (module
    docstring); ValueError naming layers_block_type where an FFN layer has no mixer before it."""
    kinds = list(kinds)
    pairs: list[tuple[int, int | None]] = []
    k = 0
    while k < len(kinds):
        if kinds[k] not in MIXERS:
            raise unsupported("layers_block_type", kinds, "each 'moe' / 'mlp' layer right after a 'linear_attention' "
                                                          f"or 'full_attention' one (layer {k} is not)")
        if k + 1 < len(kinds) and kinds[k + 1] in FFNS:
            pairs.append((k, k + 1))
            k += 2
        else:
            pairs.append((k, None))
            k += 1
    return tuple(pairs)


def hf_kinds(hf) -> list:
    """layers_block_type of a config object or config.json's dict (ModelConfig.hf_config)."""
    get = hf.get if isinstance(hf, dict) else (lambda name, default=None: getattr(hf, name, default))
    return list(get("layers_block_type", None) or [])


def _int(hf, name: str, lo: int, hi: int, default=None) -> int:
    v = getattr(hf, name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise unsupported(name, v, f"an integer in [{lo}, {hi}]")
    return v


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """NemotronHForCausalLM as transformers 5.24 builds it (module docstring): Mamba2 layers (dt clamped below at
    time_step_min, as transformers' mixer sets its time_step_limit), GQA layers without rotary (softmax scale
    head_dim ** -0.5, no biases), routed experts up/down with relu^2 and no gate (DeepSeek-V3's sigmoid noaux_tc
    router in float32: n_group / topk_group, e_score_correction_bias, norm_topk_prob, routed_scaling_factor), their
    optional latent projections (moe_latent_size), one relu^2 shared expert of moe_shared_expert_intermediate_size
    beside them, relu^2 MLP layers of intermediate_size, RMSNorms of layer_norm_epsilon."""
    kinds = hf_kinds(hf)
    allowed = MIXERS + FFNS
    if not kinds or any(k not in allowed for k in kinds):
        raise unsupported("layers_block_type", kinds, f"a list of {', '.join(map(repr, allowed))}")
    if "full_attention" not in kinds:
        raise unsupported("layers_block_type", kinds, "at least one 'full_attention' (attention) layer")
    if "moe" not in kinds:
        raise unsupported("layers_block_type", kinds, f"at least one 'moe' layer for {arch} (its dense form is not "
                                                      "built yet)")
    pairs = layer_pairs(kinds)
    if c["quantization"] is not None:
        raise unsupported("quantization_config", getattr(c["quantization"], "method", c["quantization"]), "none",
                          f" for {arch} yet")
    for name, want in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if getattr(hf, name, want) != want:
            raise unsupported(name, getattr(hf, name), (want,), f" for {arch}")
    for name in ("use_bias", "mamba_proj_bias", "mlp_bias"):
        if getattr(hf, name, False):
            raise unsupported(name, getattr(hf, name), (False,), f" for {arch}")
    if getattr(hf, "sliding_window", None) is not None:
        raise unsupported("sliding_window", hf.sliding_window, (None,), f" for {arch}")
    for name, granite in _MAMBA_FIELDS:
        _int(hf, name, 1, MAMBA2_BOUNDS[granite])
    heads, head_dim = hf.mamba_num_heads, hf.mamba_head_dim
    if heads % hf.n_groups:
        raise unsupported("n_groups", hf.n_groups, f"a divisor of mamba_num_heads={heads}")
    if hf.conv_kernel < 2:
        raise unsupported("conv_kernel", hf.conv_kernel, "an integer >= 2")
    lo = getattr(hf, "time_step_min", 0.0)
    if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not (math.isfinite(lo) and lo >= 0):
        raise unsupported("time_step_min", lo, "a finite number >= 0")
    eps = float(getattr(hf, "layer_norm_epsilon", 1e-5))
    # transformers' mixer clamps dt to (time_step_min, inf) whatever time_step_limit says.
    mamba = Mamba2Config(heads, head_dim, hf.n_groups, hf.ssm_state_size, hf.conv_kernel,
                         conv_bias=bool(getattr(hf, "use_conv_bias", True)), dt_min=float(lo), dt_max=math.inf,
                         norm_eps=eps)
    E = _int(hf, "n_routed_experts", 1, 1 << 16)
    inter = _int(hf, "moe_intermediate_size", 1, MAX_WIDTH)
    shared = _int(hf, "moe_shared_expert_intermediate_size", 1, MAX_WIDTH)
    dense = _int(hf, "intermediate_size", 1, MAX_WIDTH) if "mlp" in kinds else int(getattr(hf, "intermediate_size", 0)
                                                                                      or inter)
    latent = getattr(hf, "moe_latent_size", None)
    if latent is not None:
        _int(hf, "moe_latent_size", 1, MAX_WIDTH)
    norm = bool(getattr(hf, "norm_topk_prob", True))
    scale = getattr(hf, "routed_scaling_factor", 1.0)
    router = RouterConfig(E, c["top_k"], "sigmoid", "noaux_tc", int(getattr(hf, "n_group", 1) or 1),
                          int(getattr(hf, "topk_group", 1) or 1), norm, float(scale if scale is not None else 1.0),
                          float32_logits=True)  # transformers casts the router's input and weight to float32
    c = dict(c, rms_norm_eps=eps, num_layers=len(pairs))
    full = gqa(c, rope_config(rope, c, c["head_dim"]), nope_layers=tuple(range(len(pairs))))
    # transformers 5.24 never ties the LM head to the embeddings (NemotronHForCausalLM._tied_weights_keys is empty:
    # lm_head.weight is its own tensor whatever tie_word_embeddings says), so neither does moelink.
    return dict(num_layers=len(pairs), rms_norm_eps=eps, tie_word_embeddings=False, num_experts=E, moe_intermediate_size=inter,
                intermediate_size=dense, norm_topk_prob=norm,
                sparse_layers=tuple(j for j, (_, f) in enumerate(pairs) if f is not None and kinds[f] == "moe"),
                moe=MoEConfig(router, n_shared_experts=1, shared_expert_intermediate_size=shared, activation="relu2",
                              dense_activation="relu2"),
                attention=full,
                layer_attention=tuple(mamba if kinds[m] == "linear_attention" else full for m, _ in pairs))


__all__ = ["FFNS", "MIXERS", "hf_kinds", "layer_pairs", "read"]
