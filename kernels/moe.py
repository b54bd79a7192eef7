"""Expert computation references: align tokens by expert, then grouped SiLU-gated MLPs.

Legend: T tokens, K experts per token (top-k), E local experts, D hidden,
I expert intermediate size, F = 2I (gate and up stacked), P = T*K pairs.

Weights are stacked per layer at load time: w13_EFD holds [gate; up] rows of
each expert, w2_EDI its down projection. `expert_map_G` (optional, int32 over
all G global experts) maps a global expert id to its local index, or -1 when
the expert lives on another rank: such pairs contribute nothing here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


# Few tokens (decode): one padded batched matmul over all experts beats a loop of
# tiny matmuls, as long as padding at most doubles the work.
_PADDED_MAX_PAIRS = 256


def reference_fused_moe(
    x_TD: torch.Tensor,
    w13_EFD: torch.Tensor,
    w2_EDI: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    expert_map_G: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = Σ_k w[t,k] · down_e(silu(gate_e(x[t])) · up_e(x[t])) over the local experts e = ids[t,k].

    One matmul per expert that has tokens (tokens gathered by index, no
    padding). Returns [T, D] in x's dtype; rows whose experts are all remote are 0.
    """
    num_tokens, top_k = topk_ids_TK.shape
    out_TD = torch.zeros_like(x_TD)
    ids_P = topk_ids_TK.reshape(-1).long()
    if expert_map_G is not None:  # -1 (no expert) stays -1: indexing the map with it would wrap
        ids_P = torch.where(ids_P >= 0, expert_map_G.long()[ids_P.clamp(min=0)], torch.full_like(ids_P, -1))
    num_local = w13_EFD.shape[0]
    valid_P = ids_P >= 0
    sort_key_P = torch.where(valid_P, ids_P, torch.full_like(ids_P, num_local))
    order_P = torch.argsort(sort_key_P, stable=True)
    counts_E = torch.bincount(sort_key_P, minlength=num_local + 1)[:num_local]
    counts = counts_E.tolist()  # host sync: per-expert token counts drive the loop
    weights_P = topk_weights_TK.reshape(-1)
    num_pairs = int(valid_P.numel())
    max_count = max(counts, default=0)
    if 0 < num_pairs <= _PADDED_MAX_PAIRS and num_local * max_count <= 2 * num_pairs:
        return _padded_bmm(x_TD, w13_EFD, w2_EDI, weights_P, sort_key_P, order_P, counts_E, max_count, top_k, out_TD)
    offset = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        pairs_n = order_P[offset : offset + n]
        offset += n
        tok_n = pairs_n // top_k
        gate_nI, up_nI = F.linear(x_TD.index_select(0, tok_n), w13_EFD[e]).chunk(2, dim=-1)
        y_nD = F.linear(F.silu(gate_nI) * up_nI, w2_EDI[e])
        y_nD = y_nD * weights_P.index_select(0, pairs_n)[:, None].to(y_nD.dtype)
        out_TD.index_add_(0, tok_n, y_nD.to(out_TD.dtype))
    return out_TD


def _padded_bmm(x_TD, w13_EFD, w2_EDI, weights_P, sort_key_P, order_P, counts_E, max_count, top_k, out_TD):
    """Tokens of each expert in rows of an [E, max_count, D] buffer, two batched matmuls, scatter back."""
    num_local = w13_EFD.shape[0]
    n_valid = int(counts_E.sum())
    pairs_n = order_P[:n_valid]  # sorted by expert; remote pairs (key = num_local) sort last
    expert_n = sort_key_P.index_select(0, pairs_n)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    row_n = torch.arange(n_valid, device=x_TD.device) - starts_E.index_select(0, expert_n)
    tok_n = pairs_n // top_k
    buf_EnD = x_TD.new_zeros(num_local, max_count, x_TD.shape[1])
    buf_EnD[expert_n, row_n] = x_TD.index_select(0, tok_n)
    gate_EnI, up_EnI = torch.bmm(buf_EnD, w13_EFD.transpose(1, 2)).chunk(2, dim=-1)
    y_EnD = torch.bmm(F.silu(gate_EnI) * up_EnI, w2_EDI.transpose(1, 2))
    y_nD = y_EnD[expert_n, row_n] * weights_P.index_select(0, pairs_n)[:, None].to(y_EnD.dtype)
    out_TD.index_add_(0, tok_n, y_nD.to(out_TD.dtype))
    return out_TD
