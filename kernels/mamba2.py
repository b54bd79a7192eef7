"""Mamba2's selective state-space scan (SSD) over packed variable-length batches with per-sequence SSM states in a
state pool: plain-torch references (the contract, the float64 oracle and the CPU path). The short convolution
before it is kernels/causal_conv1d.py's (with its bias). The GPU kernels of mamba_ssm / fla-core are not used:
those are CUDA-only extras; on a GPU these references run (with host syncs), and the mamba2 layers' decode steps
are not captured in CUDA graphs (engine/models/mamba2_config.Mamba2Config.graphable).

Legend: T tokens (packed, sequence after sequence), S sequences, P state-pool slots, N heads, H head dim, G groups
(B and C shared by N / G heads each), K state size, L tokens of one block of the chunked form.

Math (transformers 5.24's GraniteMoeHybridMambaLayer / Mamba2Mixer torch paths), per head n:
    dt_t = clamp(softplus(dt_t + dt_bias), dt_min, dt_max),  A = -exp(A_log)
    h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T            ([H, K])
    y_t = h_t C_t + D x_t
computed in float32 (float64 when x is) and rounded once to x's dtype; h_0 is the slot's state (zeros for a new
sequence), the last h written back to the slot. A prefill runs the chunked (quadratic within a block of L tokens,
recurrent across blocks) form, mathematically the recurrence; a decode step the recurrence itself.

The state pool, state_pool_PNHK: [P, N, H, K] (float32, or float64 for float64 activations). Slots, padding rows
(slot -1: zeros in, nothing written) and has_initial_state_S follow kernels/gated_delta.py's protocol.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .gated_delta import check_batch_args

BLOCK = 64  # tokens of one block of the chunked form: its [L, L, N] products stay small


def check_scan_args(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1,
                    slot_ids_S, has_initial_state_S=None) -> tuple[int, int]:
    """Shape checks shared by every backend; returns (T, S)."""
    if x_TNH.dim() != 3:
        raise ValueError(f"x_TNH {tuple(x_TNH.shape)} must be [T, N, H].")
    T, N, H = x_TNH.shape
    if tuple(dt_TN.shape) != (T, N):
        raise ValueError(f"dt_TN {tuple(dt_TN.shape)} must be [T={T}, N={N}].")
    if B_TGK.dim() != 3 or B_TGK.shape[0] != T or N % B_TGK.shape[1] or tuple(C_TGK.shape) != tuple(B_TGK.shape):
        raise ValueError(f"B_TGK {tuple(B_TGK.shape)} and C_TGK {tuple(C_TGK.shape)} must be one shape [T={T}, G, K] "
                         f"with G dividing N={N}.")
    K = B_TGK.shape[2]
    for name, t in (("A_log_N", A_log_N), ("D_N", D_N), ("dt_bias_N", dt_bias_N)):
        if tuple(t.shape) != (N,):
            raise ValueError(f"{name} {tuple(t.shape)} must be [N={N}].")
    if state_pool_PNHK.dim() != 4 or tuple(state_pool_PNHK.shape[1:]) != (N, H, K):
        raise ValueError(f"state_pool_PNHK {tuple(state_pool_PNHK.shape)} must be [P, N={N}, H={H}, K={K}].")
    return T, check_batch_args(query_start_loc_S1, slot_ids_S, has_initial_state_S)


def _discretized(dt_TN, A_log_N, dt_bias_N, dt_min, dt_max, cdt):
    dt = F.softplus(dt_TN.to(cdt) + dt_bias_N.to(cdt))
    if dt_min > 0.0 or dt_max < math.inf:
        dt = dt.clamp(dt_min, dt_max)
    return dt, -torch.exp(A_log_N.to(cdt))


def _scan_one(x_LNH, dt_LN, B_LNK, C_LNK, A_N, h_NHK):
    """One block of one sequence, chunked form: (y_LNH without the D skip, the state after it), in x's dtype."""
    L = x_LNH.shape[0]
    cum_LN = torch.cumsum(dt_LN * A_N, 0)
    causal = torch.ones(L, L, dtype=torch.bool, device=x_LNH.device).tril()
    seg_LLN = (cum_LN[:, None, :] - cum_LN[None, :, :]).masked_fill(~causal[:, :, None], -math.inf)
    w_LLN = torch.exp(seg_LLN) * torch.einsum("tnk,snk->tsn", C_LNK, B_LNK) * dt_LN[None, :, :]
    y = torch.einsum("tsn,snh->tnh", w_LLN, x_LNH)
    y += torch.exp(cum_LN)[:, :, None] * torch.einsum("tnk,nhk->tnh", C_LNK, h_NHK)
    last_N = cum_LN[-1]
    w_LN = torch.exp(last_N[None, :] - cum_LN) * dt_LN
    h = torch.exp(last_N)[:, None, None] * h_NHK + torch.einsum("sn,snh,snk->nhk", w_LN, x_LNH, B_LNK)
    return y, h


def _apply(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, pool, query_start_loc_S1, slot_ids_S,
           has_initial_state_S, dt_min, dt_max, write, lengths=None):
    cdt = torch.float64 if x_TNH.dtype == torch.float64 else torch.float32
    N, G = x_TNH.shape[1], B_TGK.shape[1]
    dt_TN, A_N = _discretized(dt_TN, A_log_N, dt_bias_N, dt_min, dt_max, cdt)
    qsl = query_start_loc_S1.tolist()  # device -> host sync (the reference's CPU path: already on the host)
    slots = slot_ids_S.tolist()
    reads = [slot >= 0 for slot in slots]
    if has_initial_state_S is not None:
        reads = [r and bool(h) for r, h in zip(reads, has_initial_state_S.tolist())]
    # Every state is read before any is written (the kernels' order).
    inits = [pool[slot].to(cdt) if r else pool.new_zeros(pool.shape[1:], dtype=cdt) for slot, r in zip(slots, reads)]
    y_TNH = torch.zeros(x_TNH.shape, dtype=x_TNH.dtype, device=x_TNH.device)
    D_N1 = D_N.to(cdt)[:, None]
    for s, slot in enumerate(slots):
        a, b = qsl[s], qsl[s + 1]
        if lengths is not None:  # a replay: only the first lengths[s] tokens advance the state
            b = a + max(0, min(b - a, lengths[s]))
        h = inits[s]
        for j in range(a, b, BLOCK):
            e = min(b, j + BLOCK)
            x = x_TNH[j:e].to(cdt)
            y, h = _scan_one(x, dt_TN[j:e], B_TGK[j:e].to(cdt).repeat_interleave(N // G, 1),
                             C_TGK[j:e].to(cdt).repeat_interleave(N // G, 1), A_N, h)
            y_TNH[j:e] = (y + D_N1 * x).to(x_TNH.dtype)
        if write and slot >= 0:
            pool[slot] = h.to(pool.dtype)
    return y_TNH


def reference_mamba2_scan(
    x_TNH: torch.Tensor, dt_TN: torch.Tensor, B_TGK: torch.Tensor, C_TGK: torch.Tensor, A_log_N: torch.Tensor,
    D_N: torch.Tensor, dt_bias_N: torch.Tensor, state_pool_PNHK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, has_initial_state_S: torch.Tensor | None = None, dt_min: float = 0.0,
    dt_max: float = math.inf,
) -> torch.Tensor:
    """Prefill (any lengths): y_TNH (x's dtype), D's skip included. dt_TN is in_proj's raw dt (dt_bias, softplus and
    the clamp applied here). Each sequence starts from its slot's state (zeros where has_initial_state_S is False or
    the slot is -1) and its last state is written back to the slot."""
    check_scan_args(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1,
                    slot_ids_S, has_initial_state_S)
    return _apply(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1,
                  slot_ids_S, has_initial_state_S, dt_min, dt_max, True)


def reference_mamba2_decode(
    x_TNH: torch.Tensor, dt_TN: torch.Tensor, B_TGK: torch.Tensor, C_TGK: torch.Tensor, A_log_N: torch.Tensor,
    D_N: torch.Tensor, dt_bias_N: torch.Tensor, state_pool_PNHK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, dt_min: float = 0.0, dt_max: float = math.inf, update_state: bool = True,
) -> torch.Tensor:
    """Decode and speculative verify (a few tokens per sequence; query_start_loc_S1 = arange for plain decode): every
    sequence continues from its slot's state (slot -1: a padding row, zeros in, nothing written). update_state=False
    (a verify step): the pool is read, not written; `reference_mamba2_replay` advances it over the accepted tokens."""
    check_scan_args(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1,
                    slot_ids_S)
    return _apply(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1,
                  slot_ids_S, None, dt_min, dt_max, update_state)


def reference_mamba2_replay(
    x_TNH: torch.Tensor, dt_TN: torch.Tensor, B_TGK: torch.Tensor, C_TGK: torch.Tensor, A_log_N: torch.Tensor,
    D_N: torch.Tensor, dt_bias_N: torch.Tensor, state_pool_PNHK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, num_accepted_S: torch.Tensor, dt_min: float = 0.0, dt_max: float = math.inf,
) -> None:
    """After a verify step that left the pool untouched: each slot (>= 0) advances over the first num_accepted_S[s]
    tokens of its sequence (the verify step's x, dt, B, C; 0 keeps the state)."""
    check_scan_args(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1,
                    slot_ids_S)
    if tuple(num_accepted_S.shape) != tuple(slot_ids_S.shape):
        raise ValueError(f"num_accepted_S {tuple(num_accepted_S.shape)} must be [S={slot_ids_S.numel()}].")
    _apply(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1, slot_ids_S,
           None, dt_min, dt_max, True, lengths=num_accepted_S.tolist())  # device -> host sync (reference only)


def reference_mamba2_recurrence(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, h_NHK, dt_min=0.0,
                                dt_max=math.inf) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence, token by token (the tests' oracle for the chunked form): (y_TNH, the last state)."""
    cdt = torch.float64 if x_TNH.dtype == torch.float64 else torch.float32
    N, G = x_TNH.shape[1], B_TGK.shape[1]
    dt_TN, A_N = _discretized(dt_TN, A_log_N, dt_bias_N, dt_min, dt_max, cdt)
    h = h_NHK.to(cdt)
    ys = []
    for t in range(x_TNH.shape[0]):
        x_NH = x_TNH[t].to(cdt)
        B_NK = B_TGK[t].to(cdt).repeat_interleave(N // G, 0)
        C_NK = C_TGK[t].to(cdt).repeat_interleave(N // G, 0)
        h = torch.exp(dt_TN[t] * A_N)[:, None, None] * h + dt_TN[t][:, None, None] * x_NH[:, :, None] * B_NK[:, None]
        ys.append(torch.einsum("nhk,nk->nh", h, C_NK) + D_N.to(cdt)[:, None] * x_NH)
    y = torch.stack(ys) if ys else x_TNH.new_zeros(x_TNH.shape, dtype=cdt)
    return y.to(x_TNH.dtype), h


__all__ = ["check_scan_args", "reference_mamba2_decode", "reference_mamba2_recurrence", "reference_mamba2_replay",
           "reference_mamba2_scan"]
