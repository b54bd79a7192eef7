"""The pieces the families' config readers share (engine/models/<family>/reader.py): the rotary width, a
RopeConfig and a GQAConfig from the common fields engine/config/hf_readers.read_fields reads first."""
from __future__ import annotations

import math

from moelink.moe.router_config import RouterConfig

from ..models.gqa_config import GQAConfig
from ..models.blocks.ffn_config import MoEConfig
from ..models.rope_config import RopeConfig
from .refusals import unsupported

# The widest MLP config.json may name: intermediate_size's bound (engine/config/model.py _DIMS), 2^18, far above any
# published model's (18,432 for DeepSeek-V3's dense layers) and far below a typo's allocation.
MAX_WIDTH = 1 << 18

LAYER_TYPES = ("sliding_attention", "full_attention")


def rotary_dim(head_dim: int, factor, field_name: str = "partial_rotary_factor") -> int:
    """The rotated prefix of a head, as transformers computes it: int(head_dim * factor), even and >= 2."""
    rotary_dim = int(head_dim * float(factor))
    if not 0 < float(factor) <= 1 or rotary_dim < 2 or rotary_dim % 2:
        raise unsupported(field_name, factor, f"a factor in (0, 1] giving an even rotary width of head_dim={head_dim} "
                                              f">= 2")
    return rotary_dim



def rope_config(rope: dict, c: dict, rotary_dim: int, style: str = "neox") -> RopeConfig:
    return RopeConfig(rotary_dim, c["rope_theta"], rope["rope_type"], style)



def yarn_apply_mscale(rope: dict, scaling: float) -> float:
    """An MLA family's softmax scale with yarn's mscale_all_dim folded in, as transformers computes it
    (`yarn_apply_mscale` and `yarn_get_mscale`, one identical copy in each MLA family's modeling file: DeepSeek-V2/V3,
    LongCat-Flash, Bailing-hybrid, Hy4, ...). Written here rather than imported: importing any modeling file imports
    transformers' whole modeling stack (torch's compiler and distributed tensors, generation: ~3 s of CPU and its
    memory at every `moelink serve` and rank start of these families) for five lines. tests/engine/test_hf_config.py
    compares this with every family's copy."""
    if rope.get("rope_type", "default") != "default":
        mscale_all_dim = rope.get("mscale_all_dim", 0)
        if mscale_all_dim:
            factor = rope["factor"]
            mscale = 1.0 if factor <= 1 else 0.1 * mscale_all_dim * math.log(factor) + 1.0
            scaling = scaling * mscale * mscale
    return scaling


def gqa(c: dict, rope: RopeConfig, **kw) -> GQAConfig:
    return GQAConfig(c["num_heads"], c["num_kv_heads"], c["head_dim"], rope, **kw)



def layer_kinds(hf, field_name: str, allowed: tuple[str, ...], layers: int, where: str = "") -> tuple[str, ...]:
    """config.json's per-layer list `field_name` (layer_types, mlp_layer_types), one of `allowed` for each of the
    `layers` layers, or one error naming the field (`where`: where the file keeps it, for the message)."""
    kinds = tuple(getattr(hf, field_name, None) or ())
    if len(kinds) != layers or any(k not in allowed for k in kinds):
        raise unsupported(field_name, list(kinds), f"one of {', '.join(map(repr, allowed))} for each of the "
                                                   f"num_hidden_layers={layers} layers{where}")
    return kinds


MLP_TYPES = ("dense", "sparse")


def mla_fields(hf, c: dict) -> dict:
    """MLAConfig's shape fields from config.json's DeepSeek-style latent-attention fields (q_lora_rank null: one
    q_proj), for a family reader to complete with its rope, softmax scale and variants."""
    q_lora = getattr(hf, "q_lora_rank", None)
    return dict(num_heads=c["num_heads"], q_lora_rank=int(q_lora) if q_lora is not None else None,
                kv_lora_rank=int(hf.kv_lora_rank), qk_nope_head_dim=int(hf.qk_nope_head_dim),
                qk_rope_head_dim=int(hf.qk_rope_head_dim), v_head_dim=int(hf.v_head_dim),
                attention_bias=bool(getattr(hf, "attention_bias", False)))


def noaux_tc_moe(hf, c: dict, num_experts: int, mlp_types: tuple[str, ...], shared_experts: int) -> dict:
    """ModelConfig's MoE fields of DeepSeek-V3's routing as the newer families' transformers models run it (sigmoid
    scores in float32, the top-k of scores + e_score_correction_bias within the topk_group best of n_group groups,
    renormalised when norm_topk_prob, times routed_scaling_factor), the routed layers those mlp_layer_types call
    "sparse", beside `shared_experts` shared ones."""
    norm = bool(hf.norm_topk_prob)
    router = RouterConfig(num_experts, c["top_k"], "sigmoid", "noaux_tc", int(hf.n_group or 1),
                          int(hf.topk_group or 1), norm,
                          float(hf.routed_scaling_factor if hf.routed_scaling_factor is not None else 1.0),
                          float32_logits=True)  # transformers casts the router's input and weight to float32
    return dict(num_experts=num_experts, moe_intermediate_size=int(hf.moe_intermediate_size),
                intermediate_size=int(hf.intermediate_size), norm_topk_prob=norm,
                sparse_layers=tuple(i for i, t in enumerate(mlp_types) if t == "sparse"),
                moe=MoEConfig(router, shared_experts))


__all__ = ["LAYER_TYPES", "MAX_WIDTH", "MLP_TYPES", "gqa", "layer_kinds", "mla_fields", "noaux_tc_moe", "rope_config",
           "rotary_dim"]
