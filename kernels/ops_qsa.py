"""The QSA family of the kernel seam (kernels/ops.py): Qwen3.8-Flash-Next's indexed attention, the block selection
and gated GQA over the selected positions.

References in kernels/qsa.py; Triton in kernels/triton_qsa.py (the attention) and DSA's top-k kernel
(kernels/triton_dsa_topk.py: the selection's scores and top-k), imported only when a Triton backend is built. Legend
in qsa.py.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .attention import AttentionMetadata
from .qsa import qsa_select, reference_qsa_select, reference_sparse_gqa_attention


class QSAKernels(Protocol):
    def qsa_select(self, q_THD: torch.Tensor, keys_SBD: torch.Tensor, meta: AttentionMetadata, block_topk: int,
                   compress_ratio: int) -> torch.Tensor:
        """The selected positions per query token: int64 [T, block_topk * c + c - 1], -1 padded."""
        ...

    def sparse_gqa_attention(self, q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                             meta: AttentionMetadata, pos_TX: torch.Tensor, scale: float) -> torch.Tensor:
        """GQA over each token's selected positions only: [T, N, Hv]."""
        ...


def _triton_qsa_select(q_THD: torch.Tensor, keys_SBD: torch.Tensor, meta: AttentionMetadata, block_topk: int,
                       compress_ratio: int) -> torch.Tensor:
    from .triton_dsa_topk import triton_dsa_topk

    return qsa_select(triton_dsa_topk, q_THD, keys_SBD, meta, block_topk, compress_ratio)


def _triton() -> dict[str, Any]:
    from .triton_qsa import triton_sparse_gqa_attention

    return dict(qsa_select=_triton_qsa_select,  # DSA's Triton scores and top-k over the pooled blocks
                sparse_gqa_attention=triton_sparse_gqa_attention)  # one launch, X rows per token and kv head


registry.register("qsa", QSAKernels, triton=_triton,
                  reference=dict(qsa_select=reference_qsa_select, sparse_gqa_attention=reference_sparse_gqa_attention))
