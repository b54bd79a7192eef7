"""The block-sparse attention family of the kernel seam (kernels/ops.py): MiniMax-M3's sparse layers.

The indexer's block selection and GQA over the selected blocks of the paged cache. References in
kernels/block_sparse.py; Triton in kernels/triton_block_sparse.py (imported only when a Triton backend is built).
Legend: T tokens, N query heads, H head dim, Hv value head dim, I index head dim, S topk_blocks, B blocks, L block size.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .attention import AttentionMetadata
from .block_sparse import reference_block_sparse_attention, reference_block_sparse_select


class BlockSparseKernels(Protocol):
    def block_sparse_select(self, q_THI: torch.Tensor, index_cache_BLI: torch.Tensor, meta: AttentionMetadata,
                            block_size: int, topk_blocks: int, local_blocks: int,
                            max_len: int | None = None) -> torch.Tensor:
        """The key blocks each (token, index head) keeps: int32 [T, H, topk_blocks], -1 padded; no host sync.
        `max_len`: a bound of every sequence's length (max_model_len), what a kernel sizes its workspace by where
        host lengths are placeholders (a decode graph's)."""
        ...

    def block_sparse_attention(self, q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                               meta: AttentionMetadata, blocks_TNS: torch.Tensor, block_size: int, scale: float,
                               k_scale: float = 1.0, v_scale: float = 1.0, group: int = 1) -> torch.Tensor:
        """GQA where query head n of token t attends causally to the blocks blocks_TNS[t, n] only: [T, N, Hv].
        `group`: runs of that many consecutive query heads share their selection (a kernel may read one per run)."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_block_sparse import triton_block_sparse_attention, triton_block_sparse_select

    return dict(block_sparse_select=triton_block_sparse_select,  # block scores: one launch; top-k on the device
                block_sparse_attention=triton_block_sparse_attention)  # one launch


registry.register("block_sparse", BlockSparseKernels, triton=_triton,
                  reference=dict(block_sparse_select=reference_block_sparse_select,
                                 block_sparse_attention=reference_block_sparse_attention))
