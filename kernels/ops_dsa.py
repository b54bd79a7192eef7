"""The DSA family of the kernel seam (kernels/ops.py): DeepSeek Sparse Attention (DeepSeek-V3.2, GLM-5; GLM-5.3-Flash's
pooled selection).

The indexer's top-k positions (or pools' tokens), its keys into an fp8 key cache (e4m3 with a float32 scale per 128
values), MLA over the selected rows. References in kernels/dsa.py; Triton in kernels/triton_dsa_topk.py,
triton_dsa_pool_topk.py, triton_dsa_keys.py, triton_mla_sparse.py (imported only when a Triton backend is built).
Legend: T tokens, H indexer heads, D index dims, N heads, C latent rank, P rope dims, K top-k, B blocks, L block size.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .attention import AttentionMetadata
from .dsa import (reference_dsa_pool_topk, reference_dsa_topk, reference_sparse_mla_attention,
                  reference_write_fp8_index_keys)


class DSAKernels(Protocol):
    def dsa_topk(self, q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLD: torch.Tensor,
                 meta: AttentionMetadata, topk: int, scale: float, max_len: int | None = None) -> torch.Tensor:
        """The indexer's selection: int32 [T, topk] positions per query token, -1 past its count; no host sync."""
        ...

    def dsa_pool_topk(self, q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLX: torch.Tensor,
                      ape_PD: torch.Tensor, meta: AttentionMetadata, topk: int, scale: float,
                      max_len: int | None = None) -> torch.Tensor:
        """GLM-5.3-Flash's pooled selection: int32 [T, topk + kpool - 1] positions per query token, -1 where none."""
        ...

    def write_fp8_index_keys(self, k_TD: torch.Tensor, index_cache_BLX: torch.Tensor,
                             slot_mapping_T: torch.Tensor) -> None:
        """This step's keys quantized and scattered into an fp8 key cache, in place."""
        ...

    def sparse_mla_attention(self, q_latent_TNC: torch.Tensor, q_pe_TNP: torch.Tensor, latent_cache_BLR: torch.Tensor,
                             meta: AttentionMetadata, topk_TK: torch.Tensor, scale: float,
                             kv_scale: float = 1.0, *, sinks_N: torch.Tensor | None = None) -> torch.Tensor:
        """Absorbed MLA where token t attends to its selected positions topk_TK[t] only: [T, N, C]; sinks_N as
        mla_attention's."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_dsa_keys import triton_write_fp8_index_keys
    from .triton_dsa_pool_topk import triton_dsa_pool_topk
    from .triton_dsa_topk import triton_dsa_topk
    from .triton_mla_sparse import triton_sparse_mla_attention

    return dict(dsa_topk=triton_dsa_topk,  # the indexer's scores and top-k per query: two launches (three when split)
                dsa_pool_topk=triton_dsa_pool_topk,  # pools scored, the best pools selected, expanded: two launches
                write_fp8_index_keys=triton_write_fp8_index_keys,  # quantize + scatter: one launch
                sparse_mla_attention=triton_sparse_mla_attention)  # MLA over the selected rows only


registry.register("dsa", DSAKernels, triton=_triton,
                  reference=dict(dsa_topk=reference_dsa_topk, dsa_pool_topk=reference_dsa_pool_topk,
                                 write_fp8_index_keys=reference_write_fp8_index_keys,
                                 sparse_mla_attention=reference_sparse_mla_attention))
