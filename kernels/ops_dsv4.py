"""The DeepSeek-V4 family of the kernel seam (kernels/ops.py): the compressor's pooling, the indexer's top-k over
compressed entries, MQA with per-head sinks over the window and the entries, the grouped output projection, the
hyper-connections' residual; and a batched decode step's indexer and sink attention reading index keys and entries
through the block tables and window rows from the state slots (no gathered copy).

References in kernels/dsv4.py; Triton in kernels/triton_dsv4.py, triton_dsv4_topk.py, triton_dsv4_hc.py,
triton_dsv4_paged.py (imported only when a Triton backend is built). Legend: T tokens, n windows (or streams), m
window size, C / H widths, N heads, I index dims, E entries, S keys, G groups, W window rows, P state slots, B blocks,
Lc entries a block, M block-table width, K top-k, D hidden size.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .dsv4 import (reference_compress, reference_grouped_linear, reference_hc_expand, reference_indexer_topk,
                   reference_paged_indexer_topk, reference_paged_sink_attention, reference_sink_attention)


class DSV4Kernels(Protocol):
    def dsv4_compress(self, kv_nmC: torch.Tensor, gate_nmC: torch.Tensor, prev_kv_nmH: torch.Tensor | None,
                      prev_gate_nmH: torch.Tensor | None) -> torch.Tensor:
        """One entry per window, the softmax-gated sum of its kv rows (CSA: the previous window's half too): [n, H]."""
        ...

    def dsv4_indexer_topk(self, q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_EI: torch.Tensor,
                          visible_T: torch.Tensor, top_k: int) -> torch.Tensor:
        """The lightning indexer's top_k entries per query among its visible ones: int32 [T, top_k], then -1."""
        ...

    def dsv4_sink_attention(self, q_TNH: torch.Tensor, k_SH: torch.Tensor, allowed_TS: torch.Tensor,
                            sinks_N: torch.Tensor, scale: float) -> torch.Tensor:
        """MQA over one shared head that is key and value, a sink logit per head: [T, N, H]."""
        ...

    def dsv4_grouped_linear(self, x_TGd: torch.Tensor, w_GoD: torch.Tensor) -> torch.Tensor:
        """Each of G groups of heads [d] projected by its own [o, d] block: [T, G, o]."""
        ...

    def dsv4_hc_expand(self, x_TnD: torch.Tensor, out_TD: torch.Tensor, post_Tn: torch.Tensor,
                       comb_Tnn: torch.Tensor) -> torch.Tensor:
        """The hyper-connections' residual step: stream k = post[k] * out + sum_j comb[j, k] * x[j], [T, n, D]."""
        ...

    def dsv4_paged_indexer_topk(self, q_TnI: torch.Tensor, w_Tn: torch.Tensor, keys_BLcI: torch.Tensor,
                                table_TM: torch.Tensor, visible_T: torch.Tensor, top_k: int) -> torch.Tensor:
        """dsv4_indexer_topk for a batched decode step, the keys read through the block table."""
        ...

    def dsv4_paged_sink_attention(self, q_TNH: torch.Tensor, window_PWH: torch.Tensor, slot_T: torch.Tensor,
                                  pos_T: torch.Tensor, entries_BLcH: torch.Tensor | None, table_TM: torch.Tensor | None,
                                  picks_TK: torch.Tensor | None, visible_T: torch.Tensor | None,
                                  sinks_N: torch.Tensor, scale: float, *, rope_dims: int = 0) -> torch.Tensor:
        """dsv4_sink_attention for a batched decode step: the window ring and the paged entries read in place."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_dsv4 import triton_dsv4_compress, triton_dsv4_grouped_linear, triton_dsv4_sink_attention
    from .triton_dsv4_hc import triton_dsv4_hc_expand
    from .triton_dsv4_paged import triton_dsv4_paged_indexer_topk, triton_dsv4_paged_sink_attention
    from .triton_dsv4_topk import triton_dsv4_indexer_topk

    return dict(dsv4_compress=triton_dsv4_compress,  # a step's closed windows pooled: one launch
                dsv4_indexer_topk=triton_dsv4_indexer_topk,  # scores, then DSA's top-k kernels: two (three split)
                dsv4_sink_attention=triton_dsv4_sink_attention,  # window + entries + sink, online softmax
                dsv4_grouped_linear=triton_dsv4_grouped_linear,
                dsv4_hc_expand=triton_dsv4_hc_expand,  # the mix and the residual add: one pass over the streams
                dsv4_paged_indexer_topk=triton_dsv4_paged_indexer_topk,  # keys read through the block table
                dsv4_paged_sink_attention=triton_dsv4_paged_sink_attention)  # ring + paged entries: one (split: two)


registry.register("dsv4", DSV4Kernels, triton=_triton,
                  reference=dict(dsv4_compress=reference_compress, dsv4_indexer_topk=reference_indexer_topk,
                                 dsv4_sink_attention=reference_sink_attention,
                                 dsv4_grouped_linear=reference_grouped_linear, dsv4_hc_expand=reference_hc_expand,
                                 dsv4_paged_indexer_topk=reference_paged_indexer_topk,
                                 dsv4_paged_sink_attention=reference_paged_sink_attention))
