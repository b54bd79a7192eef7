"""config.json → ModelConfig's fields, one reader per model family, from the config object transformers built.

transformers owns the file's aliases and defaults (engine/config/model.py reads it through AutoConfig); a reader
maps that object onto moelink's fields, picks the layer kinds (attention kind, rope, MoE layout) and refuses,
with one sentence naming the field, any value moelink cannot run.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from .architectures import DSA_ARCHITECTURES, MLA_ARCHITECTURES  # latent attention (ArchSpec.latent_attention)
from .dsv4 import read_dsv4
from .hf_dsa import dsa_attention, dsa_sparse_layers
from .quantization import check_architecture, read_quantization
from .linear_attention import LinearAttentionConfig
from .layer_configs import ROPE_TYPES, GQAConfig, MLAConfig, MoEConfig, RopeConfig, unsupported

# The routing scheme of each DeepSeek-style family as transformers implements it: the scoring function and
# the topk_methods it runs. transformers does not read `scoring_func` / `topk_method` for DeepSeek-V3 and
# GLM-4-MoE, so a file that names another scheme would silently run this one: such a file is refused.
_DEEPSEEK_ROUTING = {
    "DeepseekV3ForCausalLM": ("sigmoid", ("noaux_tc",)),
    "Glm4MoeForCausalLM": ("sigmoid", ("noaux_tc",)),
    "DeepseekV2ForCausalLM": ("softmax", ("greedy", "group_limited_greedy")),
    "DeepseekV32ForCausalLM": ("sigmoid", ("noaux_tc",)),
    "GlmMoeDsaForCausalLM": ("sigmoid", ("noaux_tc",)),
}
# The widest MLP config.json may name: intermediate_size's bound (engine/config/model.py _DIMS), 2^18, far above any
# published model's (18,432 for DeepSeek-V3's dense layers) and far below a typo's allocation.
_MAX_WIDTH = 1 << 18
_ROPE_FIELD = "rope_parameters.rope_type (rope_scaling.rope_type or rope_scaling.type in older files)"


def read_fields(arch: str, hf) -> dict:
    """ModelConfig's fields (all but model, dtype, architecture, max_model_len, hf_config) from `hf`."""
    # Quantized weights carry their scales (engine/config/quantization.py reads every quant_method moelink runs and
    # refuses the rest); a format's reader plugs in there, not here. MXFP4 is gpt-oss's experts only.
    quantization = read_quantization(getattr(hf, "quantization_config", None))
    check_architecture(quantization, arch)
    hidden_act = getattr(hf, "hidden_act", "silu")
    # gpt-oss's experts run their clamped SwiGLU whatever hidden_act says (transformers never reads it there).
    if hidden_act != "silu" and arch != "GptOssForCausalLM":
        raise unsupported("hidden_act", hidden_act, ("silu",), " (moelink's MLPs are SiLU-gated)")
    rope = _rope_parameters(hf)
    num_layers, num_heads = int(hf.num_hidden_layers), int(hf.num_attention_heads)
    theta = rope.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    eos = getattr(hf, "eos_token_id", None)
    common = dict(
        vocab_size=int(hf.vocab_size), hidden_size=int(hf.hidden_size), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
        head_dim=int(getattr(hf, "head_dim", None) or hf.hidden_size // num_heads),
        rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-6)),
        rope_theta=float(theta) if isinstance(theta, (int, float)) else 10000.0,  # a reader sets a by-kind model's
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 4096)),
        top_k=int(hf.num_experts_per_tok),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ()),
        quantization=quantization,
    )
    family = _READERS.get(arch, _deepseek)
    return {**common, **family(arch, hf, common, rope)}


def _rope_parameters(hf) -> dict:
    """transformers' rope_parameters (it rewrites the older rope_scaling / rope_theta into them), checked. A
    model with one rope per layer kind keeps them by kind ({"full_attention": {...}, "sliding_attention": {...}},
    MiMo-V2-Flash): each is checked, and the dict is returned by kind."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    if rope and all(k in _LAYER_TYPES and isinstance(v, dict) for k, v in rope.items()):
        return {kind: _checked_rope(dict(v), f"rope_parameters.{kind}.rope_type") for kind, v in rope.items()}
    return _checked_rope(rope, _ROPE_FIELD)


def _checked_rope(rope: dict, field_name: str) -> dict:
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise unsupported(field_name, rope_type, ROPE_TYPES)
    return dict(rope, rope_type=rope_type)


def _rotary_dim(head_dim: int, factor, field_name: str = "partial_rotary_factor") -> int:
    """The rotated prefix of a head, as transformers computes it: int(head_dim * factor), even and >= 2."""
    rotary_dim = int(head_dim * float(factor))
    if not 0 < float(factor) <= 1 or rotary_dim < 2 or rotary_dim % 2:
        raise unsupported(field_name, factor, f"a factor in (0, 1] giving an even rotary width of head_dim={head_dim} "
                                              f">= 2")
    return rotary_dim


def _rope(rope: dict, c: dict, rotary_dim: int, style: str = "neox") -> RopeConfig:
    return RopeConfig(rotary_dim, c["rope_theta"], rope["rope_type"], style)


def _gqa(c: dict, rope: RopeConfig, **kw) -> GQAConfig:
    return GQAConfig(c["num_heads"], c["num_kv_heads"], c["head_dim"], rope, **kw)


def _qwen3_moe(arch: str, hf, c: dict, rope: dict) -> dict:
    if getattr(hf, "use_sliding_window", False):
        raise unsupported("use_sliding_window", True, (False,), " (moelink's Qwen3-MoE attention is full-context)")
    if getattr(hf, "attention_bias", False):
        raise unsupported("attention_bias", True, (False,), " for Qwen3MoeForCausalLM (q/k/v/o without bias)")
    E = int(hf.num_experts)  # transformers' attribute_map: num_experts and num_local_experts are one field
    only_dense = set(getattr(hf, "mlp_only_layers", None) or [])
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    sparse = tuple(i for i in range(c["num_layers"]) if i not in only_dense and E > 0 and (i + 1) % step == 0)
    norm = bool(hf.norm_topk_prob)
    # Qwen3 normalises each head's q and k before rotary.
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm, sparse_layers=sparse,
                moe=MoEConfig(RouterConfig(E, c["top_k"], norm_topk_prob=norm)),
                attention=_gqa(c, _rope(rope, c, c["head_dim"]), qk_norm=True))


def _mixtral(arch: str, hf, c: dict, rope: dict) -> dict:
    if getattr(hf, "sliding_window", None) is not None:
        raise unsupported("sliding_window", hf.sliding_window, (None,), " (moelink's Mixtral attention is full-context)")
    E, inter = int(hf.num_local_experts), int(hf.intermediate_size)
    # Mixtral's softmax over the top-k logits is a softmax over all experts renormalised over the top-k.
    return dict(num_experts=E, moe_intermediate_size=inter, intermediate_size=inter, norm_topk_prob=True,
                sparse_layers=tuple(range(c["num_layers"])),
                moe=MoEConfig(RouterConfig(E, c["top_k"], norm_topk_prob=True)),
                attention=_gqa(c, _rope(rope, c, c["head_dim"])))


def _deepseek(arch: str, hf, c: dict, rope: dict) -> dict:
    """DeepSeek-V2/V3 and GLM-4-MoE: n_routed_experts, group-limited routing, first_k_dense_replace,
    shared experts; MLA attention (DeepSeek) or GQA with partial rotary (GLM)."""
    scoring, methods = _DEEPSEEK_ROUTING[arch]
    scoring_func = getattr(hf, "scoring_func", None) or scoring
    if scoring_func != scoring:
        raise unsupported("scoring_func", scoring_func, (scoring,), f" for {arch} (transformers' model scores experts with {scoring!r})")
    method = getattr(hf, "topk_method", None) or methods[0]
    if method not in methods:
        raise unsupported("topk_method", method, methods, f" for {arch}")
    norm = bool(getattr(hf, "norm_topk_prob", False))
    if arch == "DeepseekV2ForCausalLM" and norm:
        raise unsupported("norm_topk_prob", True, (False,), f" for {arch} (transformers' DeepSeek-V2 never renormalises its top-k)")
    if getattr(hf, "mlp_bias", False):
        raise unsupported("mlp_bias", True, (False,), f" for {arch} (moelink's MLPs have no bias)")
    E = int(hf.n_routed_experts)
    grouped = method != "greedy"  # "greedy" reads no groups: all experts form one
    router = RouterConfig(
        E, c["top_k"], scoring_func, method, hf.n_group if grouped else 1, hf.topk_group if grouped else 1,
        norm, hf.routed_scaling_factor, float32_logits=True,  # transformers casts gate input and weight to float32
    )
    first_dense = int(getattr(hf, "first_k_dense_replace", 0) or 0)
    moe = MoEConfig(router, int(getattr(hf, "n_shared_experts", 0) or 0), first_dense,
                    getattr(hf, "moe_layer_freq", None) or 1)
    # DeepSeek-V3.2 / GLM-5 route the layers mlp_layer_types calls sparse (transformers derives it from
    # first_k_dense_replace when the file has none).
    sparse = (dsa_sparse_layers(hf, c["num_layers"]) if arch in DSA_ARCHITECTURES
              else tuple(range(first_dense, c["num_layers"])))
    fields = dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                  intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm, sparse_layers=sparse, moe=moe)
    if arch in DSA_ARCHITECTURES:
        fields["num_kv_heads"] = c["num_heads"]
        fields.update(dsa_attention(arch, hf, c["num_layers"], _mla(arch, hf, c, rope)))
    elif arch in MLA_ARCHITECTURES:
        fields["num_kv_heads"] = c["num_heads"]
        fields["attention"] = _mla(arch, hf, c, rope)
    else:
        # GLM-4-MoE rotates the first partial_rotary_factor of each head (transformers keeps the factor in
        # rope_parameters), normalises q/k when use_qk_norm, and has q/k/v biases when attention_bias.
        factor = float(rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))
        rotary_dim = _rotary_dim(c["head_dim"], factor)
        fields["attention"] = _gqa(c, _rope(rope, c, rotary_dim), qk_norm=bool(getattr(hf, "use_qk_norm", False)),
                                   qkv_bias=bool(getattr(hf, "attention_bias", False)))
    return fields


def _mla(arch: str, hf, c: dict, rope: dict) -> MLAConfig:
    # The softmax scale exactly as transformers' model computes it (yarn's mscale_all_dim folded in).
    if arch == "DeepseekV3ForCausalLM" or arch in DSA_ARCHITECTURES:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
        # rope_interleave: DeepSeek's checkpoints pair rope dims (2i, 2i+1); transformers reads the flag (DeepSeek-V3.2
        # and GLM-5 always interleave, whatever the file says).
        interleave = arch in DSA_ARCHITECTURES or getattr(hf, "rope_interleave", True)
        style = "interleaved" if interleave else "neox"
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import yarn_apply_mscale
        style = "complex"  # transformers' DeepSeek-V2 rotates (2i, 2i+1) pairs as complex64 numbers
    nope, pe = int(hf.qk_nope_head_dim), int(hf.qk_rope_head_dim)
    q_lora = getattr(hf, "q_lora_rank", None)
    return MLAConfig(
        num_heads=c["num_heads"], q_lora_rank=int(q_lora) if q_lora is not None else None,
        kv_lora_rank=int(hf.kv_lora_rank), qk_nope_head_dim=nope, qk_rope_head_dim=pe, v_head_dim=int(hf.v_head_dim),
        rope=_rope(rope, c, pe, style), softmax_scale=float(yarn_apply_mscale(rope, (nope + pe) ** -0.5)),
        attention_bias=bool(getattr(hf, "attention_bias", False)),
    )


_LAYER_TYPES = ("sliding_attention", "full_attention")


def _gpt_oss(arch: str, hf, c: dict, rope: dict) -> dict:
    """gpt-oss: GQA with q/k/v/o biases (attention_bias), per-head attention sinks, a sliding window on the
    layers layer_types names "sliding_attention"; every layer routed (router with a bias, top-k then softmax
    over the k), experts with biases and the clamped SwiGLU; YaRN rope over the whole head (neox pairs;
    `truncate` is read by transformers' own yarn, which computes the table)."""
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    if len(layer_types) != c["num_layers"] or any(t not in _LAYER_TYPES for t in layer_types):
        raise unsupported("layer_types", list(layer_types), f"one of {', '.join(map(repr, _LAYER_TYPES))} for each "
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
                attention=_gqa(c, _rope(rope, c, c["head_dim"]), qkv_bias=bias, o_bias=bias, sinks=True,
                               sliding_window=window if sliding else None, sliding_layers=sliding))


def _minimax_m2(arch: str, hf, c: dict, rope: dict) -> dict:
    """MiniMax-M2: every layer full GQA (attn_type_list all 1: M2 has none of MiniMax-01's lightning attention)
    with q and k RMS-normed across all heads at once (one [N * H] and one [K * H] weight, applied to the
    projections before they split into heads: qk_norm_type "per_layer"), rotary over the first rotary_dim dims of
    each head (transformers turns rotary_dim into partial_rotary_factor); every layer routed over
    num_local_experts: sigmoid scores, the top-k of scores + e_score_correction_bias, weighted by the unbiased
    scores renormalised to sum to 1 (DeepSeek-V3's noaux_tc with one group), the gate in the model dtype; no
    shared experts. transformers' model reads none of the flags below: a file that sets one otherwise describes
    a model it does not build, and is refused."""
    kinds = getattr(hf, "attn_type_list", None)
    if kinds is not None and (not isinstance(kinds, (list, tuple)) or len(kinds) != c["num_layers"]
                              or any(k != 1 for k in kinds)):
        raise unsupported("attn_type_list", kinds, f"1 (full attention) for each of the num_hidden_layers="
                                                   f"{c['num_layers']} layers (MiniMax-M2 has no lightning-attention "
                                                   f"layers, 0)")
    for name, want in (("use_qk_norm", True), ("qk_norm_type", "per_layer"), ("scoring_func", "sigmoid"),
                       ("use_routing_bias", True), ("shared_intermediate_size", 0), ("routed_scaling_factor", 1.0)):
        value = getattr(hf, name, None)
        if value is not None and value != want:
            raise unsupported(name, value, (want,), f" for {arch} (transformers' model runs {name}={want!r})")
    E = int(hf.num_local_experts)
    router = RouterConfig(E, c["top_k"], "sigmoid", "noaux_tc", 1, 1, norm_topk_prob=True)
    factor = rope.get("partial_rotary_factor", 1.0)
    return dict(num_experts=E, moe_intermediate_size=int(hf.intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=True,
                sparse_layers=tuple(range(c["num_layers"])), moe=MoEConfig(router),
                attention=_gqa(c, _rope(rope, c, _rotary_dim(c["head_dim"], factor, "rotary_dim / head_dim")),
                               qk_norm="all_heads"))


_MLP_TYPES = ("dense", "sparse")


def _mimo_v2_flash(arch: str, hf, c: dict, rope: dict) -> dict:
    """MiMo-V2-Flash: layer_types mixes full and sliding-window GQA layers, which differ as transformers builds
    them: a sliding layer has 2 * num_key_value_heads kv heads, a learned sink per query head and the
    sliding_attention rope (its own theta); a full layer num_key_value_heads and no sink. Both: q/k head_dim,
    values of v_head_dim scaled by attention_value_scale before they are cached, q/k/v biases when
    attention_bias (o_proj never), softmax scale head_dim^-0.5, rotary over int(head_dim * partial_rotary_factor)
    dims. mlp_layer_types: a dense MLP or routed experts (DeepSeek-V3's noaux_tc: sigmoid, groups, correction
    bias, float32 gate; no shared experts). Its MTP layers (`model.mtp.*`) are not read (transformers ignores
    them too)."""
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    if len(layer_types) != c["num_layers"] or any(t not in _LAYER_TYPES for t in layer_types):
        raise unsupported("layer_types", list(layer_types), f"one of {', '.join(map(repr, _LAYER_TYPES))} for each "
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
        rotary = _rotary_dim(H, params.get("partial_rotary_factor", 0.334),  # transformers' default for MiMo
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


def _qwen3_next(arch: str, hf, c: dict, rope: dict) -> dict:
    """Qwen3-Next and Qwen3.5-MoE's text model: layer_types says which layers run gated DeltaNet ("linear_attention": their shape is
    LinearAttentionConfig's, read from the linear_* fields) and which gated full attention ("full_attention": GQA
    with per-head q/k norm, a sigmoid output gate and partial rotary); norms are zero-centred (weight + 1); the MoE
    block has one shared expert of its own width behind a sigmoid gate, and softmax top-k routing."""
    layer_types = tuple(getattr(hf, "layer_types", None) or ())
    kinds = ("linear_attention", "full_attention")
    if len(layer_types) != c["num_layers"] or any(t not in kinds for t in layer_types):
        raise unsupported("layer_types", list(layer_types), f"one of {', '.join(map(repr, kinds))} for each of the "
                                                            f"num_hidden_layers={c['num_layers']} layers")
    if "full_attention" not in layer_types:
        raise unsupported("layer_types", list(layer_types), "at least one 'full_attention' layer")
    if getattr(hf, "attention_bias", False):
        raise unsupported("attention_bias", True, (False,), f" for {arch}")
    factor = float(rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))
    full = _gqa(c, _rope(rope, c, _rotary_dim(c["head_dim"], factor)), qk_norm="per_head", output_gate=True)
    linear = LinearAttentionConfig(int(hf.linear_num_key_heads), int(hf.linear_num_value_heads),
                                   int(hf.linear_key_head_dim), int(hf.linear_value_head_dim),
                                   int(hf.linear_conv_kernel_dim),
                                   projection="split" if arch == "Qwen3_5MoeForCausalLM" else "fused")
    E = int(hf.num_experts)
    only_dense = set(getattr(hf, "mlp_only_layers", None) or [])
    step = int(getattr(hf, "decoder_sparse_step", 1) or 1)
    sparse = tuple(i for i in range(c["num_layers"]) if i not in only_dense and E > 0 and (i + 1) % step == 0)
    norm = bool(getattr(hf, "norm_topk_prob", True))  # Qwen3.5 always renormalises (its config has no field)
    # transformers' Qwen3NextSparseMoeBlock (and Qwen3.5-MoE's) always builds the shared MLP at this width and its
    # sigmoid gate: at 0 the MLP is empty and adds exactly 0 to every token, gate or not. moelink reads 0 as that: no
    # shared expert, its empty tensors and its gate not read (the same tokens as transformers: tests/engine/
    # test_qwen3_next.py). A width is bounded as intermediate_size is (engine/config/model.py _DIMS).
    shared = getattr(hf, "shared_expert_intermediate_size", 0)
    if isinstance(shared, bool) or not isinstance(shared, int) or not 0 <= shared <= _MAX_WIDTH:
        raise unsupported("shared_expert_intermediate_size", shared, f"an integer in [0, {_MAX_WIDTH}] (0: no "
                                                                     f"shared expert)")
    moe = MoEConfig(RouterConfig(E, c["top_k"], norm_topk_prob=norm), n_shared_experts=1 if shared else 0,
                    shared_expert_intermediate_size=shared, shared_expert_gate=bool(shared))
    if len(sparse) < c["num_layers"] and not getattr(hf, "intermediate_size", None):
        raise unsupported("intermediate_size", getattr(hf, "intermediate_size", None),
                          "a positive integer (mlp_only_layers / decoder_sparse_step leave dense layers)")
    return dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(getattr(hf, "intermediate_size", 0) or 0), norm_topk_prob=norm,
                sparse_layers=sparse, moe=moe, attention=full, layer_attention=tuple(linear if t == "linear_attention" else full for t in layer_types),
                norm_weight_offset=1.0)


_READERS = {"Qwen3MoeForCausalLM": _qwen3_moe, "Qwen3NextForCausalLM": _qwen3_next, "Qwen3_5MoeForCausalLM": _qwen3_next, "MixtralForCausalLM": _mixtral, "GptOssForCausalLM": _gpt_oss,
            "MiniMaxM2ForCausalLM": _minimax_m2, "MiMoV2FlashForCausalLM": _mimo_v2_flash,
            "DeepseekV4ForCausalLM": read_dsv4}
