"""config.json → ModelConfig's fields, one reader per model family, from the config object transformers built.

transformers owns the file's aliases and defaults (engine/config/model.py reads it through AutoConfig); a reader
maps that object onto moelink's fields, picks the layer kinds (attention kind, rope, MoE layout) and refuses,
with one sentence naming the field, any value moelink cannot run.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from .architectures import MLA_ARCHITECTURES  # multi-head latent attention (ArchSpec.latent_attention)
from .quantization import check_architecture, read_quantization
from .layer_configs import ROPE_TYPES, GQAConfig, MLAConfig, MoEConfig, RopeConfig, unsupported

# The routing scheme of each DeepSeek-style family as transformers implements it: the scoring function and
# the topk_methods it runs. transformers does not read `scoring_func` / `topk_method` for DeepSeek-V3 and
# GLM-4-MoE, so a file that names another scheme would silently run this one: such a file is refused.
_DEEPSEEK_ROUTING = {
    "DeepseekV3ForCausalLM": ("sigmoid", ("noaux_tc",)),
    "Glm4MoeForCausalLM": ("sigmoid", ("noaux_tc",)),
    "DeepseekV2ForCausalLM": ("softmax", ("greedy", "group_limited_greedy")),
}
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
    eos = getattr(hf, "eos_token_id", None)
    common = dict(
        vocab_size=int(hf.vocab_size), hidden_size=int(hf.hidden_size), num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or num_heads),
        head_dim=int(getattr(hf, "head_dim", None) or hf.hidden_size // num_heads),
        rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))),
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 4096)),
        top_k=int(hf.num_experts_per_tok),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        eos_token_ids=tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ()),
        quantization=quantization,
    )
    family = _READERS.get(arch, _deepseek)
    return dict(common, **family(arch, hf, common, rope))


def _rope_parameters(hf) -> dict:
    """transformers' rope_parameters (it rewrites the older rope_scaling / rope_theta into them), checked."""
    rope = dict(getattr(hf, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise unsupported(_ROPE_FIELD, rope_type, ROPE_TYPES)
    return dict(rope, rope_type=rope_type)


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
    fields = dict(num_experts=E, moe_intermediate_size=int(hf.moe_intermediate_size),
                  intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm,
                  sparse_layers=tuple(range(first_dense, c["num_layers"])), moe=moe)
    if arch in MLA_ARCHITECTURES:
        fields["num_kv_heads"] = c["num_heads"]
        fields["attention"] = _mla(arch, hf, c, rope)
    else:
        # GLM-4-MoE rotates the first partial_rotary_factor of each head (transformers keeps the factor in
        # rope_parameters), normalises q/k when use_qk_norm, and has q/k/v biases when attention_bias.
        factor = float(rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", None) or 1.0))
        rotary_dim = int(c["head_dim"] * factor)
        if not 0 < factor <= 1 or rotary_dim < 2 or rotary_dim % 2:
            raise unsupported("partial_rotary_factor", factor, f"a factor in (0, 1] giving an even rotary width of "
                                                               f"head_dim={c['head_dim']} >= 2")
        fields["attention"] = _gqa(c, _rope(rope, c, rotary_dim), qk_norm=bool(getattr(hf, "use_qk_norm", False)),
                                   qkv_bias=bool(getattr(hf, "attention_bias", False)))
    return fields


def _mla(arch: str, hf, c: dict, rope: dict) -> MLAConfig:
    # The softmax scale exactly as transformers' model computes it (yarn's mscale_all_dim folded in).
    if arch == "DeepseekV3ForCausalLM":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
        # rope_interleave: DeepSeek's checkpoints pair rope dims (2i, 2i+1); transformers reads the flag.
        style = "interleaved" if getattr(hf, "rope_interleave", True) else "neox"
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


_READERS = {"Qwen3MoeForCausalLM": _qwen3_moe, "MixtralForCausalLM": _mixtral, "GptOssForCausalLM": _gpt_oss}
