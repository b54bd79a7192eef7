"""Mixtral's config reader.

config.json, as transformers read it, onto ModelConfig's fields (engine/config/hf_readers.read_fields calls `read`
after the common fields); a value moelink cannot run is refused naming the field.
"""
from __future__ import annotations

from moelink.moe.router_config import RouterConfig

from ..blocks.ffn_config import MoEConfig
from ...config.refusals import unsupported
from ...config.reader_parts import gqa, rope_config


def read(arch: str, hf, c: dict, rope: dict) -> dict:
    if getattr(hf, "sliding_window", None) is not None:
        raise unsupported("sliding_window", hf.sliding_window, (None,), " (moelink's Mixtral attention is full-context)")
    E, inter = int(hf.num_local_experts), int(hf.intermediate_size)
    # Mixtral's softmax over the top-k logits is a softmax over all experts renormalised over the top-k.
    return dict(num_experts=E, moe_intermediate_size=inter, intermediate_size=inter, norm_topk_prob=True,
                sparse_layers=tuple(range(c["num_layers"])),
                moe=MoEConfig(RouterConfig(E, c["top_k"], norm_topk_prob=True)),
                attention=gqa(c, rope_config(rope, c, c["head_dim"])))



__all__ = ["read"]
