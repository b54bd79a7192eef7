"""A rank's view of a model's attention under tensor parallelism: its heads (docs/tensor-parallelism.md).

A TP group of N ranks splits each attention layer's heads N ways: GQA's query heads (and its kv heads, or, when
there are fewer kv heads than ranks, each rank holds the one kv head its query heads read, replicated as vLLM
does), MLA's heads (the latent, one row per token, is every head's: each rank caches it whole, as vLLM and SGLang
do; DeepSeek Sparse Attention's indexer and its key cache are whole on every rank too), gated DeltaNet's q/k heads
and the value heads of their groups (the conv and recurrent states are per head: a rank's state slots hold its
heads only). `shard_attention` gives the config one rank runs: its KV cache and state pools are sized from it
(engine/rank/kv_cache.py, engine/state/cache.py), and the layers are built from it (engine/models/gqa.py, mla.py,
gated_deltanet.py), reading their shard of each checkpoint tensor. Compressed attention (DeepSeek-V4's,
engine/models/compressed_attention_config.py) splits its heads and its output groups (o_groups) N ways; its one shared KV
head, compressed entries, indexer keys and window ring are every head's and stay whole on each rank
(engine/models/deepseek_v4/attention.py).

What a TP group cannot split yet is refused before any of this runs, by engine/config/tensor_parallel.py (the
flags' half of the feature: `check_tp_layout`, `check_tensor_parallel`).
"""
from __future__ import annotations

import dataclasses

from ..models.compressed_attention_config import CompressedAttentionConfig
from ..models.shared_compressed_attention_config import SharedCompressedAttentionConfig
from ..models.gqa_config import GQAConfig
from ..models.mla_config import MLAConfig
from ..models.gated_deltanet_config import LinearAttentionConfig


def kv_head_start(rank: int, size: int, num_kv_heads: int) -> int:
    """The first global kv head rank `rank` of `size` holds: its own K/size heads, or (K < size) the one its query
    heads read, replicated over size/K ranks. rank * K // size gives both (size=4, K=2: ranks 0, 1 -> head 0)."""
    return rank * num_kv_heads // size


def shard_attention(attn, size: int):
    """`attn` as one rank of a TP group of `size` holds it: heads / size (GQA's kv heads at least one; gated
    DeltaNet's q/k heads and value heads)."""
    if size == 1:
        return attn
    if isinstance(attn, LinearAttentionConfig):
        return dataclasses.replace(attn, num_k_heads=attn.num_k_heads // size, num_v_heads=attn.num_v_heads // size)
    if isinstance(attn, GQAConfig):
        return dataclasses.replace(attn, num_heads=attn.num_heads // size,
                                   num_kv_heads=max(1, attn.num_kv_heads // size))
    if isinstance(attn, MLAConfig):
        return dataclasses.replace(attn, num_heads=attn.num_heads // size)
    if isinstance(attn, (CompressedAttentionConfig, SharedCompressedAttentionConfig)):  # heads feed their groups
        return dataclasses.replace(attn, num_heads=attn.num_heads // size, o_groups=attn.o_groups // size)
    raise ValueError(f"attention kind {attn.kind!r} has no tensor-parallel layout.")


def tp_local_config(cfg, size: int):
    """The ModelConfig one rank of a TP group runs: every layer's attention sharded (shard_attention). Shapes that
    are not per-head (hidden, vocab, experts) are unchanged: the layers shard their own weights."""
    if size == 1:
        return cfg
    layers = tuple(shard_attention(a, size) for a in cfg.layer_attention)
    return dataclasses.replace(cfg, attention=shard_attention(cfg.attention, size), layer_attention=layers)


__all__ = ["kv_head_start", "shard_attention", "tp_local_config"]
