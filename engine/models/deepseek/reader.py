"""The DeepSeek-V3 family's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..dsa_reader import dsa_attention, dsa_sparse_layers
from ..mla_config import MLAConfig
from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config, rotary_dim, yarn_apply_mscale
from .config import ARCHITECTURES, DSA_ARCHITECTURES

# The architectures of multi-head latent attention (ArchSpec.latent_attention).
MLA_ARCHITECTURES = tuple(a.name for a in ARCHITECTURES if a.spec is not None and a.spec.latent_attention)


# The routing scheme of each DeepSeek-style family as transformers implements it: the scoring function and
# the topk_methods it runs. transformers does not read `scoring_func` / `topk_method` for DeepSeek-V3 and
# GLM-4-MoE, so a file that names another scheme would silently run this one: such a file is refused.
_DEEPSEEK_ROUTING = {
    "DeepseekV3ForCausalLM": ("sigmoid", ("noaux_tc",)),
    "Glm4MoeForCausalLM": ("sigmoid", ("noaux_tc",)),
    "DeepseekV2ForCausalLM": ("softmax", ("greedy", "group_limited_greedy")),
    "DeepseekV32ForCausalLM": ("sigmoid", ("noaux_tc",)),
    "GlmMoeDsaForCausalLM": ("sigmoid", ("noaux_tc",)),
    "Glm4MoeLiteForCausalLM": ("sigmoid", ("noaux_tc",)),
    "SarvamMLAForCausalLM": ("sigmoid", ("noaux_tc",)),
}
# The architectures whose routed layers are mlp_layer_types' "sparse" ones (transformers derives the field from
# first_k_dense_replace for DeepSeek-V3.2 / GLM-5; GLM-4.7-Flash's model reads mlp_layer_types alone, its default
# ["dense"] + ["sparse"] * (num_hidden_layers - 1)).
_BY_MLP_LAYER_TYPES = DSA_ARCHITECTURES + ("Glm4MoeLiteForCausalLM",)


def read(arch: str, hf, c: dict, rope: dict) -> dict:
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
    # DeepSeek-V3.2 / GLM-5 / GLM-4.7-Flash route the layers mlp_layer_types calls sparse (transformers derives it
    # from first_k_dense_replace when the file has none, but for GLM-4.7-Flash, whose model never reads that field).
    sparse = (dsa_sparse_layers(hf, c["num_layers"]) if arch in _BY_MLP_LAYER_TYPES
              else tuple(range(first_dense, c["num_layers"])))
    if arch == "Glm4MoeLiteForCausalLM":
        # The leading dense layers, as the MTP layer's rule (engine/spec/heads/mtp.py) reads them: its layer routed.
        first_dense = sparse[0] if sparse else c["num_layers"]
    moe = MoEConfig(router, int(getattr(hf, "n_shared_experts", 0) or 0), first_dense,
                    getattr(hf, "moe_layer_freq", None) or 1)
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
        rotary = rotary_dim(c["head_dim"], factor)
        fields["attention"] = gqa(c, rope_config(rope, c, rotary), qk_norm=bool(getattr(hf, "use_qk_norm", False)),
                                   qkv_bias=bool(getattr(hf, "attention_bias", False)))
    return fields


def _mla(arch: str, hf, c: dict, rope: dict) -> MLAConfig:
    # The softmax scale exactly as transformers' model computes it (yarn's mscale_all_dim folded in).
    if arch in ("DeepseekV3ForCausalLM", "Glm4MoeLiteForCausalLM", "SarvamMLAForCausalLM") or arch in DSA_ARCHITECTURES:
        # rope_interleave: DeepSeek's checkpoints pair rope dims (2i, 2i+1); transformers reads the flag (DeepSeek-V3.2
        # and GLM-5 always interleave, whatever the file says).
        interleave = arch in DSA_ARCHITECTURES or getattr(hf, "rope_interleave", True)
        style = "interleaved" if interleave else "neox"
    else:
        style = "complex"  # transformers' DeepSeek-V2 rotates (2i, 2i+1) pairs as complex64 numbers
    nope, pe = int(hf.qk_nope_head_dim), int(hf.qk_rope_head_dim)
    factor = rope.get("partial_rotary_factor", 1.0)
    if arch == "Glm4MoeLiteForCausalLM" and factor != 1.0:
        # transformers' GLM-4.7-Flash sizes its rotary table by qk_rope_head_dim * the factor but rotates all
        # qk_rope_head_dim dims of q and k with it: only the whole rope head runs as defined.
        raise unsupported("rope_parameters.partial_rotary_factor", factor, (1.0,),
                          f" for {arch} (MLA rotates all qk_rope_head_dim dims)")
    q_lora = getattr(hf, "q_lora_rank", None)
    return MLAConfig(
        num_heads=c["num_heads"], q_lora_rank=int(q_lora) if q_lora is not None else None,
        kv_lora_rank=int(hf.kv_lora_rank), qk_nope_head_dim=nope, qk_rope_head_dim=pe, v_head_dim=int(hf.v_head_dim),
        rope=rope_config(rope, c, pe, style), softmax_scale=float(yarn_apply_mscale(rope, (nope + pe) ** -0.5)),
        attention_bias=bool(getattr(hf, "attention_bias", False)),
    )



__all__ = ["read"]
