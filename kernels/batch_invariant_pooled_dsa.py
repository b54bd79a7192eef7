"""The batch-invariant backend's pooled DSA selection (GLM-5.3-Flash; kernels/dsa.reference_dsa_pool_topk holds the
contract this keeps).

What moves with the batch in the reference: the pools' scores are two einsums over a width padded to the step's
longest row (`max_seq_len // kpool` pools). Here each row's pools are scored BLOCK at a time (the H x D by D x BLOCK
product of its index queries and pool keys, relu, then the 1 x H by H x BLOCK product with its weights: one shape per
model, kernels/batch_invariant.fixed_bmm); the pool keys' softmax over each pool's kpool positions and their weighted
sum run on the mode's row tiles (kernels/batch_invariant.py), and the choice is the reference's rule.

Legend: T tokens, H index heads, D index head dim, P pools, k kpool, W positions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import AttentionMetadata
from .batch_invariant import fixed_bmm
from .dsa import pool_keys, pool_positions, pool_shape, pool_slots, reference_topk_positions

BLOCK = 16  # pools per scoring product


def invariant_dsa_pool_topk(q_THD: torch.Tensor, weights_TH: torch.Tensor, index_cache_BLX: torch.Tensor,
                            ape_PD: torch.Tensor, meta: AttentionMetadata, topk: int, scale: float,
                            max_len: int | None = None) -> torch.Tensor:
    """`reference_dsa_pool_topk`'s selection (int32 [T, topk + kpool - 1] positions, -1 where none), each row's
    pool scores computed alone."""
    T, H, D = q_THD.shape
    kp, P, n_T = pool_shape(q_THD, weights_TH, index_cache_BLX, ape_PD, meta, max_len)
    dev = q_THD.device
    L, X = index_cache_BLX.shape[1:]
    pos_W = torch.arange(P * kp, device=dev)
    visible_TW = pos_W[None, :] < n_T[:, None]
    slots_TW = pool_slots(meta, slice(0, T), pos_W, visible_TW, L)
    r_TWX = index_cache_BLX.view(-1, X).index_select(0, slots_TW.reshape(-1)).view(T, P * kp, X)
    # On the mode's tiles: a pool's softmax over its kpool positions and the weighted sum, per (row, pool, channel).
    pool_TPD = pool_keys(r_TWX, ape_PD, P).float()
    with torch._C.DisableTorchFunction():
        width = -(-P // BLOCK) * BLOCK
        pool_TPD = F.pad(pool_TPD, (0, 0, 0, width - P))
        q_THD32 = q_THD.float().contiguous()
        w_T1H = weights_TH.float().view(T, 1, H).contiguous()
        score_TP = torch.empty(T, width, dtype=torch.float32, device=dev)
        for j in range(0, width, BLOCK):
            dots_THB = fixed_bmm(q_THD32, pool_TPD[:, j:j + BLOCK].transpose(1, 2).contiguous())
            score_TP[:, j:j + BLOCK] = fixed_bmm(w_T1H, torch.relu(dots_THB * scale))[:, 0] + 0.0
        pools_TK = reference_topk_positions(score_TP[:, :P], n_T // kp, topk // kp).long()
        return pool_positions(pools_TK, n_T, kp)


__all__ = ["BLOCK", "invariant_dsa_pool_topk"]
