"""Shared compressed attention as config (issue 81; DeepSeek-V4.1 runs it, engine/models/deepseek_v41/ reads its
config.json into these): one config per layer, its cache layout and its per-sequence state. Pure data: no model code,
no device (engine/models/deepseek_v41/attention.py runs it).

Every layer is V4's latent shared-KV attention (one KV head that is its own value, per-head sinks, a sliding window of
raw KV, a grouped low-rank output projection). What V4.1 changes is who owns the compressed KV (CSA2): the layers
named by `kv_source_layer_ids` own a compressor (pooling `compress_rate` tokens into one entry, or at rate 1 one
entry per token) and publish its entries; every later layer with a nonzero rate, up to the next source, reads that
source's entries instead of computing its own. An index source scores the entries with its indexer and publishes
each query's top-k; the layers after it reuse those picks (`index` "reuse"). A KV source's indexer owns the index keys
(`index` "keys": derived from the compressor's latent); a later index source ("reindex") scores with its own query
weights against its group's keys, inside the candidate blocks the candidate source published (`candidates`).

The cache of a layer (engine/rank allocates it from these shapes):
- paged, on the sequence's block ids, for a KV source only: its entries ([B, L / m, H], `block_size / m` per block)
  and its index keys ([B, L / m, I]); the layers reading them own no paged tensor;
- per sequence, in a state slot (the hybrid cache manager's, whose checkpoints make prefix hits exact): the window's
  raw KV (a ring of `sliding_window` rows, position mod window), at a source with m > 1 the rows of the group still
  filling (each token's kv and gate, float32, a ring of m), and at an Engram layer the last `engram_context`
  compressed token ids (int64, id + 1: 0 is "no token", a fresh slot), the n-gram look-back.

Legend: P state slots (the null slot included), B blocks (the null block included), L block size, H head_dim,
I index_head_dim, W sliding window, m compress rate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .compressed_attention_config import positive_int
from .rope_config import RopeConfig
from ..config.refusals import unsupported

INDEX_ROLES = ("none", "keys", "reindex", "reuse")  # no entries / owns keys / scores its group's keys / reuses picks
CANDIDATE_ROLES = ("none", "publish", "use")


@dataclass(frozen=True)
class SharedCompressedAttentionConfig:
    """One V4.1 attention layer (module docstring). `source`: the KV-source layer whose entries it reads (its own
    index at a source), -1 for a sliding-only layer."""

    kind: ClassVar[str] = "shared_compressed"
    # A decode CUDA graph would freeze the per-sequence host lengths its attention reads (engine/rank/graph_policy.py).
    graphable: ClassVar[bool] = False
    num_heads: int
    head_dim: int
    q_lora_rank: int
    o_groups: int
    o_lora_rank: int
    sliding_window: int
    rope: RopeConfig  # the layer's: "main" for a sliding-only layer, "compress" otherwise
    compress_rope: RopeConfig  # the entries' and the indexer's
    layer_idx: int
    compress_rate: int = 0  # 0: sliding only; 1: an entry per token; m > 1: m tokens pooled
    source: int = -1
    index: str = "none"
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
    candidates: str = "none"
    candidate_topk_blocks: int = 0
    candidate_block_size: int = 0
    engram_context: int = 0  # the n-gram look-back an Engram layer keeps per sequence (0: no Engram here)
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("num_heads", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "sliding_window"):
            positive_int(name, getattr(self, name))
        if self.num_heads % self.o_groups:
            raise unsupported("o_groups", self.o_groups, f"a divisor of num_attention_heads={self.num_heads}")
        if self.rope.rotary_dim > self.head_dim or self.rope.rotary_dim % 2:
            raise unsupported("qk_rope_head_dim", self.rope.rotary_dim, f"an even number of at most head_dim="
                                                                         f"{self.head_dim}")
        if self.index not in INDEX_ROLES:
            raise unsupported("index_source_layer_ids", self.index, INDEX_ROLES)
        if self.candidates not in CANDIDATE_ROLES:
            raise unsupported("candidate_source_layer_id", self.candidates, CANDIDATE_ROLES)
        if (self.compress_rate == 0) != (self.source < 0):
            raise ValueError(f"layer {self.layer_idx}: compress_ratios[{self.layer_idx}]={self.compress_rate} "
                             f"needs a kv_source_layer_ids entry at or before it exactly when it is nonzero.")
        if self.index in ("keys", "reindex"):
            for name in ("index_n_heads", "index_head_dim", "index_topk"):
                positive_int(name, getattr(self, name))
            if self.rope.rotary_dim > self.index_head_dim:
                raise unsupported("index_head_dim", self.index_head_dim,
                                  f"at least the {self.rope.rotary_dim} rotary dims (the indexer rotates its tail)")
        if self.candidates != "none":
            positive_int("candidate_topk_blocks", self.candidate_topk_blocks)
            positive_int("candidate_block_size", self.candidate_block_size)

    @property
    def is_source(self) -> bool:
        return self.source == self.layer_idx

    @property
    def softmax_scale(self) -> float:
        return self.head_dim**-0.5

    def check_block_size(self, block_size: int) -> None:
        """An entry never straddles two blocks: the block size is a multiple of the compress rate."""
        if self.compress_rate and block_size % self.compress_rate:
            raise ValueError(f"block_size={block_size} is invalid for DeepSeek-V4.1: it must be a multiple of every "
                             f"compress rate (this model's include {self.compress_rate}).")

    def kv_layer_pairs(self, num_layers: int) -> None:
        return None

    def cache_shapes(self, num_blocks: int, block_size: int, cache_dtype=None) -> tuple[tuple[int, ...], ...]:
        """A source's (entries_BLcH, index_keys_BLcI), Lc = block_size / m; () for the layers that read them."""
        self._check_cache(cache_dtype)
        if not self.is_source:
            return ()
        self.check_block_size(block_size)
        per_block = block_size // self.compress_rate
        widths = (self.head_dim,) + ((self.index_head_dim,) if self.index == "keys" else ())
        return tuple((num_blocks + 1, per_block, w) for w in widths)

    @staticmethod
    def _check_cache(cache_dtype) -> None:
        if cache_dtype is not None and cache_dtype.itemsize == 1:
            raise ValueError(f"kv_cache_dtype={cache_dtype} is not supported for DeepSeek-V4.1 yet: its cache holds "
                             "the model's own fake-quantized values (FP8 window, FP4 entries) in the model dtype "
                             "(kv_cache_dtype='auto').")

    def cache_dtypes(self, cache_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        return tuple(cache_dtype for _ in self.cache_shapes(0, self.compress_rate or 1))

    def kv_values_per_token(self) -> int:
        if not self.is_source:
            return 0
        width = self.head_dim + (self.index_head_dim if self.index == "keys" else 0)
        return -(-width // self.compress_rate)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.kv_values_per_token() * dtype.itemsize

    def _slot_shapes(self) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = [(self.sliding_window, self.head_dim)]
        if self.is_source and self.compress_rate > 1:
            shapes.append((self.compress_rate, 2 * self.head_dim))
        if self.engram_context:
            shapes.append((self.engram_context,))
        return shapes

    def state_shapes(self, num_slots: int) -> tuple[tuple[int, ...], ...]:
        """(window_PWH[, compressor_PmC][, engram_PK]), the null slot included (the last)."""
        return tuple((num_slots + 1, *s) for s in self._slot_shapes())

    def state_dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        """The window in the model dtype, the filling group's rows in at least float32 (transformers pools them in
        float32), the n-gram look-back int64."""
        out = [dtype]
        if self.is_source and self.compress_rate > 1:
            out.append(torch.promote_types(dtype, torch.float32))
        if self.engram_context:
            out.append(torch.int64)
        return tuple(out)

    def state_bytes_per_sequence(self, dtype: torch.dtype) -> int:
        return sum(math.prod(s) * d.itemsize for s, d in zip(self._slot_shapes(), self.state_dtypes(dtype)))


__all__ = ["CANDIDATE_ROLES", "INDEX_ROLES", "SharedCompressedAttentionConfig"]
