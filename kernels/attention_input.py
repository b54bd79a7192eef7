"""A decode step's GQA attention input as one op (`reference_norm_qkv_rope_kv`): the residual add and the input
RMSNorm, the stacked q/k/v projection, then kernels/rotary.py's rope_write_kv (per-head q/k norm, rotary, the
paged-KV write). The reference is that composition, the contract and the oracle; kernels/triton_qkv_rope_kv.py
does it in one launch for a decode batch (its MAX_TOKENS).

Legend: T tokens, D hidden, N query heads, K kv heads, H head dim, Hv value head dim, R = N H + K H + K Hv
projection rows, P positions, B cache blocks, L block size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import DEFAULT_BLOCK, reference_fp8_linear
from .norm import FUSED_MAX_TOKENS, reference_add_rms_norm, reference_rms_norm
from .rotary import reference_rope_write_kv


# The largest batch the one-launch form takes (kernels/norm.py's FUSED_MAX_TOKENS: why).
MAX_TOKENS = FUSED_MAX_TOKENS


def block_rows(head_dim: int, v_head_dim: int) -> int | None:
    """The largest rows-a-program (8 to 64, a power of two) dividing both head widths; None: no such (the fused
    input does not take the layer)."""
    for bn in (64, 32, 16, 8):
        if head_dim % bn == 0 and v_head_dim % bn == 0:
            return bn
    return None


def fused(T: int, head_dim: int, v_head_dim: int) -> bool:
    """Whether one launch takes this batch: a decode batch (T <= MAX_TOKENS) of heads `block_rows` can split."""
    return 0 < T <= MAX_TOKENS and block_rows(head_dim, v_head_dim) is not None


def reference_norm_qkv_rope_kv(
    x_TD: torch.Tensor, residual_TD: torch.Tensor | None, norm_D: torch.Tensor, norm_eps: float, w_RD: torch.Tensor,
    bias_R: torch.Tensor | None, num_q_heads: int, num_kv_heads: int, v_head_dim: int, positions_T: torch.Tensor,
    cos_sin_PR: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor, slot_mapping_T: torch.Tensor,
    q_norm_H: torch.Tensor | None = None, k_norm_H: torch.Tensor | None = None, eps: float = 1e-6,
    k_scale: float = 1.0, v_scale: float = 1.0, counters_G: torch.Tensor | None = None, *,
    w_scale_inv: torch.Tensor | None = None, block: tuple[int, int] = DEFAULT_BLOCK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, x + residual): h = rms_norm(x + residual) (of x alone when residual is None, which is then returned as
    the sum), qkv = h w_RDᵀ (+ bias_R) split into q [T, N, H], k [T, K, H], v [T, K, Hv] (H: the caches' head
    dim), then rope_write_kv's contract: k and v normed, roped and written to their slots, q returned so.
    counters_G: the one-launch form's head-group counters (kernels/triton_qkv_rope_kv.group_counters), unused
    here. w_scale_inv: w_RD is an FP8 weight with these block scales (`block`), qkv the W8A8 linear
    (fp8.reference_fp8_linear)."""
    H = k_cache_BLKH.shape[-1]
    N, K = num_q_heads, num_kv_heads
    if w_RD.shape[0] != N * H + K * (H + v_head_dim):
        raise ValueError(f"w_RD has {w_RD.shape[0]} rows: it must stack q, k and v, N*H + K*(H + Hv) = "
                         f"{N * H + K * (H + v_head_dim)} (N={N}, K={K}, H={H}, Hv={v_head_dim}).")
    if residual_TD is None:
        h_TD, summed_TD = reference_rms_norm(x_TD, norm_D, norm_eps), x_TD
    else:
        h_TD, summed_TD = reference_add_rms_norm(x_TD, residual_TD, norm_D, norm_eps)
    T = x_TD.shape[0]
    if w_scale_inv is None:
        qkv_TR = F.linear(h_TD, w_RD, bias_R)
    else:
        qkv_TR = reference_fp8_linear(h_TD, w_RD, w_scale_inv, block, bias_R)
    q_TNH = qkv_TR[:, :N * H].view(T, N, H)
    k_TKH = qkv_TR[:, N * H:(N + K) * H].view(T, K, H)
    v_TKH = qkv_TR[:, (N + K) * H:].view(T, K, v_head_dim)
    q_TNH = reference_rope_write_kv(q_TNH, k_TKH, v_TKH, positions_T, cos_sin_PR, k_cache_BLKH, v_cache_BLKH,
                                    slot_mapping_T, q_norm_H, k_norm_H, eps, k_scale, v_scale)
    return q_TNH, summed_TD
