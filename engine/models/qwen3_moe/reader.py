"""Qwen3-MoE's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
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
                attention=gqa(c, rope_config(rope, c, c["head_dim"]), qk_norm=True))



__all__ = ["read"]
