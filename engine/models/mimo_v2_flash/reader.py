"""MiMo-V2-Flash's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..gqa_config import GQAConfig
from ..blocks.ffn_config import MoEConfig
from ..rope_config import RopeConfig
from ...config.refusals import unsupported
from ...config.reader_parts import LAYER_TYPES, rotary_dim


_MLP_TYPES = ("dense", "sparse")


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    """MiMo-V2-Flash: layer_types mixes full and sliding-window GQA layers, which differ as transformers builds
    them: a sliding layer has 2 * num_key_value_heads kv heads, a learned sink per query head and the
    sliding_attention rope (its own theta); a full layer num_key_value_heads and no sink. Both: q/k head_dim,
    values of v_head_dim scaled by attention_value_scale before they are cached, q/k/v biases when
    attention_bias (o_proj never), softmax scale head_dim^-0.5, rotary over int(head_dim * partial_rotary_factor)
    dims. mlp_layer_types: a dense MLP or routed experts (DeepSeek-V3's noaux_tc: sigmoid, groups, correction
    bias, float32 gate; no shared experts). Its MTP layers (`model.mtp.*`) are not read (transformers ignores
    them too)."""
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    if len(layer_types) != c["num_layers"] or any(t not in LAYER_TYPES for t in layer_types):
        raise unsupported("layer_types", list(layer_types), f"one of {', '.join(map(repr, LAYER_TYPES))} for each "
                                                            f"of the num_hidden_layers={c['num_layers']} layers")
    mlp_types = tuple(getattr(hf, "mlp_layer_types", None) or ())
    if len(mlp_types) != c["num_layers"] or any(t not in _MLP_TYPES for t in mlp_types):
        raise unsupported("mlp_layer_types", list(mlp_types), f"one of {', '.join(map(repr, _MLP_TYPES))} for each "
                                                              f"of the num_hidden_layers={c['num_layers']} layers")
    # The original file's spellings, which transformers 5.24 does not read: where one is present it must say
    # what transformers builds, or the checkpoint would be run as another model.
    _agree(hf, "hybrid_layer_pattern", [int(t == "sliding_attention") for t in layer_types],
           "layer_types (0 = full_attention, 1 = sliding_attention)")
    _agree(hf, "moe_layer_freq", [int(t == "sparse") for t in mlp_types], "mlp_layer_types (0 = dense, 1 = sparse)",
           scalar_ok=True)
    H, K, N = c["head_dim"], c["num_kv_heads"], c["num_heads"]
    Hv = int(getattr(hf, "v_head_dim", None) or H)
    for name, want in (("swa_num_key_value_heads", 2 * K), ("swa_num_attention_heads", N), ("swa_head_dim", H),
                       ("swa_v_head_dim", Hv), ("add_swa_attention_sink_bias", True),
                       ("add_full_attention_sink_bias", False), ("scoring_func", "sigmoid"),
                       ("topk_method", "noaux_tc")):
        value = getattr(hf, name, None)
        if value is not None and value != want:
            raise unsupported(name, value, (want,), f" for {arch} (transformers' model runs {name}={want!r})")
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    window = getattr(hf, "sliding_window", None)
    if sliding and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise unsupported("sliding_window", window, "a positive integer (layer_types has sliding_attention layers)")
    if not set(layer_types) <= set(rope):
        raise unsupported("rope_parameters", sorted(rope), f"one rope per layer type ({', '.join(sorted(set(layer_types)))})")
    # The original file's rope fields, which transformers 5.24 does not read either (its rope_parameters hold them).
    for name, kinds, key in (("rope_theta", ("full_attention",), "rope_theta"),
                             ("swa_rope_theta", ("sliding_attention",), "rope_theta"),
                             ("partial_rotary_factor", tuple(rope), "partial_rotary_factor")):
        value = getattr(hf, name, None)
        for kind in kinds:
            want = rope.get(kind, {}).get(key, 0.334 if key == "partial_rotary_factor" else None)
            if value is not None and kind in rope and float(value) != float(want):
                raise unsupported(name, value, (want,), f" (rope_parameters.{kind}.{key}, which transformers runs)")
    n_shared = getattr(hf, "n_shared_experts", None)
    if n_shared:
        raise unsupported("n_shared_experts", n_shared, (0, None), f" for {arch} (transformers' model has no shared "
                                                                   f"experts)")
    scale = getattr(hf, "attention_value_scale", None)
    bias = bool(getattr(hf, "attention_bias", False))

    def attention(kind: str) -> GQAConfig:
        params = rope[kind]
        rotary = rotary_dim(H, params.get("partial_rotary_factor", 0.334),  # transformers' default for MiMo
                             f"rope_parameters.{kind}.partial_rotary_factor")
        r = RopeConfig(rotary, float(params["rope_theta"]), params["rope_type"], "neox", kind)
        swa = kind == "sliding_attention"
        return GQAConfig(N, 2 * K if swa else K, H, r, qkv_bias=bias, sinks=swa,
                         sliding_window=window if sliding else None, sliding_layers=sliding,
                         v_head_dim=Hv if Hv != H else None, value_scale=1.0 if scale is None else float(scale))

    by_kind = {kind: attention(kind) for kind in sorted(set(layer_types))}
    full = by_kind.get("full_attention", by_kind["sliding_attention"])
    sparse = tuple(i for i, t in enumerate(mlp_types) if t == "sparse")
    E = int(hf.n_routed_experts)
    norm = bool(hf.norm_topk_prob)
    router = RouterConfig(E, c["top_k"], "sigmoid", "noaux_tc", int(hf.n_group), int(hf.topk_group), norm,
                          float(hf.routed_scaling_factor or 1.0), float32_logits=True)
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm, sparse_layers=sparse,
                moe=MoEConfig(router), rope_theta=full.rope.theta, attention=full,
                layer_attention=tuple(by_kind[t] for t in layer_types))


def _agree(hf, name: str, want: list, what: str, scalar_ok: bool = False) -> None:
    value = getattr(hf, name, None)
    if value is None or (scalar_ok and not isinstance(value, (list, tuple))):
        return
    if not isinstance(value, (list, tuple)) or [int(v) for v in value] != want:
        raise unsupported(name, value, f"{want} (what {what} says; transformers builds the model from those)")



__all__ = ["read"]
