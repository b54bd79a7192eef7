"""The compressed-KV attention family of the kernel seam (kernels/ops.py): attention over a sliding window of raw
KV plus compressed entries, each summarising `compress_rate` tokens (CSA / HCA; DeepSeek-V4 runs it): the
compressor's pooling, the lightning indexer's top-k over compressed entries, MQA with per-head sinks over the window
and the entries, the grouped output projection; and a batched decode step's indexer and sink attention reading index
keys and entries through the block tables and window rows from the state slots (no gathered copy).

References in kernels/compressed_attention.py; Triton in kernels/triton_compressed_attention.py,
triton_compressed_topk.py, triton_compressed_attention_paged.py (imported only when a Triton backend is built).
Legend: T tokens, n windows, m window size, C / H widths, N heads, I index dims, E entries, S keys, G groups, W
window rows, P state slots, B blocks, Lc entries a block, M block-table width, K top-k.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .compressed_attention import (reference_compress, reference_grouped_linear, reference_indexer_topk,
                                   reference_paged_indexer_topk, reference_paged_sink_attention,
                                   reference_sink_attention)


class CompressedAttentionKernels(Protocol):
    def compress_kv(self, kv_nmC: torch.Tensor, gate_nmC: torch.Tensor, prev_kv_nmH: torch.Tensor | None,
                    prev_gate_nmH: torch.Tensor | None) -> torch.Tensor:
        """One entry per window, the softmax-gated sum of its kv rows (CSA: the previous window's half too): [n, H]."""
        ...

    def compressed_indexer_topk(self, q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_EI: torch.Tensor,
                                visible_T: torch.Tensor, top_k: int) -> torch.Tensor:
        """The lightning indexer's top_k entries per query among its visible ones: int32 [T, top_k], then -1."""
        ...

    def sink_attention(self, q_TNH: torch.Tensor, k_SH: torch.Tensor, allowed_TS: torch.Tensor,
                       sinks_N: torch.Tensor, scale: float) -> torch.Tensor:
        """MQA over one shared head that is key and value, a sink logit per head: [T, N, H]."""
        ...

    def grouped_linear(self, x_TGd: torch.Tensor, w_GoD: torch.Tensor) -> torch.Tensor:
        """Each of G groups of heads [d] projected by its own [o, d] block: [T, G, o]."""
        ...

    def paged_compressed_indexer_topk(self, q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_BLcI: torch.Tensor,
                                      table_TM: torch.Tensor, visible_T: torch.Tensor, top_k: int) -> torch.Tensor:
        """compressed_indexer_topk for a batched decode step, the keys read through the block table."""
        ...

    def paged_sink_attention(self, q_TNH: torch.Tensor, window_PWH: torch.Tensor, slot_T: torch.Tensor,
                             pos_T: torch.Tensor, entries_BLcH: torch.Tensor | None, table_TM: torch.Tensor | None,
                             picks_TK: torch.Tensor | None, visible_T: torch.Tensor | None,
                             sinks_N: torch.Tensor, scale: float, *, rope_dims: int = 0) -> torch.Tensor:
        """sink_attention for a batched decode step: the window ring and the paged entries read in place."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_compressed_attention import triton_compress_kv, triton_grouped_linear, triton_sink_attention
    from .triton_compressed_attention_paged import triton_paged_compressed_indexer_topk, triton_paged_sink_attention
    from .triton_compressed_topk import triton_compressed_indexer_topk

    return dict(compress_kv=triton_compress_kv,  # a step's closed windows pooled: one launch
                compressed_indexer_topk=triton_compressed_indexer_topk,  # scores, then DSA's top-k: two (three split)
                sink_attention=triton_sink_attention,  # window + entries + sink, online softmax
                grouped_linear=triton_grouped_linear,
                paged_compressed_indexer_topk=triton_paged_compressed_indexer_topk,  # keys read through the table
                paged_sink_attention=triton_paged_sink_attention)  # ring + paged entries: one (split: two)


registry.register("compressed_attention", CompressedAttentionKernels, triton=_triton,
                  reference=dict(compress_kv=reference_compress, compressed_indexer_topk=reference_indexer_topk,
                                 sink_attention=reference_sink_attention, grouped_linear=reference_grouped_linear,
                                 paged_compressed_indexer_topk=reference_paged_indexer_topk,
                                 paged_sink_attention=reference_paged_sink_attention))
