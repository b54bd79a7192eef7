"""Block-sparse attention as config (MiniMax-M3's sparse layers): GQA whose queries attend only to the key blocks an
indexer selects. Pure data; the module is engine/models/block_sparse.py, the kernels kernels/block_sparse.py.

What it computes (transformers 5.24's MiniMaxM3VLIndexer and build_block_mask are the definition): an indexer of H
heads of Di dims scores every query token t against every earlier key j of its sequence,
    s[t, h, j] = q[t, h] . k[j]         (float32; q = rope(norm(index_q_proj(x))), one key k = rope(norm(index_k_proj(x))))
max-pools the scores over blocks of `block_size` positions (position j is in block j // block_size), forces the
`local_blocks` blocks ending at the query's own block in (+inf), and keeps the `topk_blocks` best blocks per (t, h).
Query head n attends, causally, to the keys of the blocks its index head n // (N / H) kept and to no other.
A query whose context holds at most topk_blocks blocks keeps them all: dense attention.

The key cache: one index key row of Di values per token beside the layer's K and V, in the same blocks (so the
scheduler's block accounting, prefix caching and PD transfers cover it); in the KV cache's dtype, or in
bfloat16 under an fp8 KV cache (a selection is a ranking: the keys stay in float).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .gqa_config import GQAConfig
from ..config.refusals import unsupported


@dataclass(frozen=True)
class BlockIndexerConfig:
    """One layer's block indexer (module docstring)."""

    num_heads: int  # index_n_heads: query heads split into this many groups, one selection each
    head_dim: int  # index_head_dim
    block_size: int  # index_block_size: positions per scored block
    topk_blocks: int  # index_topk_blocks: blocks each query attends to
    local_blocks: int  # index_local_blocks: the blocks up to the query's own, always kept

    def __post_init__(self) -> None:
        for name, lo in (("num_heads", 1), ("head_dim", 2), ("block_size", 1), ("topk_blocks", 1),
                         ("local_blocks", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                field = "index_" + {"num_heads": "n_heads"}.get(name, name)
                raise unsupported(field, v, f"an integer >= {lo}")
        if self.local_blocks > self.topk_blocks:
            # transformers boosts the local blocks to +inf: more of them than top-k slots is a tie it breaks by
            # sort order, a selection no kernel reproduces.
            raise unsupported("index_local_blocks", self.local_blocks,
                              f"at most index_topk_blocks={self.topk_blocks}")

    def key_cache_dtype(self, cache_dtype: torch.dtype) -> torch.dtype:
        """The KV cache's dtype, or bfloat16 under an fp8 KV cache (module docstring)."""
        return cache_dtype if cache_dtype.itemsize >= 2 else torch.bfloat16

    def key_bytes_per_token(self, cache_dtype: torch.dtype) -> int:
        return self.head_dim * self.key_cache_dtype(cache_dtype).itemsize


@dataclass(frozen=True)
class BlockSparseConfig(GQAConfig):
    """GQA (GQAConfig's fields: heads, rope, per-head q/k norms) with a block indexer; `indexer` None: a dense layer
    of the same model (MiniMax-M3's full_attention layers), GQA's cache and attention exactly."""

    kind: ClassVar[str] = "block_sparse"
    indexer: BlockIndexerConfig | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        ix = self.indexer
        if ix is None:
            return
        if self.num_heads % ix.num_heads:
            raise unsupported("index_n_heads", ix.num_heads,
                              f"a divisor of num_attention_heads={self.num_heads} (each index head selects for a "
                              f"group of query heads)")
        if ix.head_dim < self.rope.rotary_dim:
            # transformers rotates the index heads with the first index_head_dim angles of the layer's table: a
            # rotation only when they cover its whole rotary width.
            raise unsupported("index_head_dim", ix.head_dim, f"at least the rotary width {self.rope.rotary_dim}")
        if self.sliding_layers or self.sinks or self.output_gate or self.v_head_dim is not None:
            raise ValueError("BlockSparseConfig: sliding windows, sinks, output gates and a value head width of "
                             "their own are not block-sparse attention's.")

    def cache_shapes(self, num_blocks: int, block_size: int,
                     cache_dtype: torch.dtype | None = None) -> tuple[tuple[int, ...], ...]:
        """GQA's (k_cache_BLKH, v_cache_BLKH), and with an indexer its key cache index_cache_BLI on the same ids."""
        kv = super().cache_shapes(num_blocks, block_size, cache_dtype)
        if self.indexer is None:
            return kv
        return (*kv, (num_blocks + 1, block_size, self.indexer.head_dim))

    def cache_dtypes(self, cache_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        kv = super().cache_dtypes(cache_dtype)
        if self.indexer is None:
            return kv
        return (*kv, self.indexer.key_cache_dtype(cache_dtype))

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        index = self.indexer.key_bytes_per_token(dtype) if self.indexer is not None else 0
        return super().kv_bytes_per_token(dtype) + index


__all__ = ["BlockIndexerConfig", "BlockSparseConfig"]
