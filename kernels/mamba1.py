"""Mamba1's selective scan (the S6 recurrence) over packed variable-length batches with per-sequence SSM states in
a state pool: plain-torch references (the contract, the float64 oracle and the CPU path). The short convolution
before it is kernels/causal_conv1d.py's (with its bias), as Mamba2's is. mamba_ssm's CUDA kernels are not used.

Legend: T tokens (packed, sequence after sequence), S sequences, P state-pool slots, I channels (intermediate),
K state size.

Math (transformers 5.24's JambaMambaMixer torch path, `mamba_selective_scan` / `mamba_selective_state_update`),
per channel i:
    dt_t = softplus(dt_t + dt_bias)                      (dt_t: dt_proj's matmul, without its bias)
    A = -exp(A_log)                                      ([I, K]: one decay per channel and state entry)
    h_t = exp(dt_t A) * h_{t-1} + dt_t x_t B_t           ([I, K]; B_t, C_t [K] shared by every channel)
    y_t = h_t C_t + D x_t
computed in float32 (float64 when x is) and rounded once to x's dtype; h_0 is the slot's state (zeros for a new
sequence), the last h written back to the slot. The gate (y * silu(z)) is the mixer's (engine/models/mamba1.py).
Every form here is the recurrence itself, token by token (Mamba1's decay differs per state entry, so the chunked
form's [L, L, I, K] products would be the size of a block of states per token pair).

The state pool, state_pool_PIK: [P, I, K] (float32, or float64 for float64 activations). Slots, padding rows
(slot -1: zeros in, nothing written) and has_initial_state_S follow kernels/gated_delta.py's protocol.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .gated_delta import check_batch_args


def check_scan_args(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1,
                    slot_ids_S, has_initial_state_S=None) -> tuple[int, int]:
    """Shape checks shared by every backend; returns (T, S)."""
    if x_TI.dim() != 2:
        raise ValueError(f"x_TI {tuple(x_TI.shape)} must be [T, I].")
    T, I = x_TI.shape
    if tuple(dt_TI.shape) != (T, I):
        raise ValueError(f"dt_TI {tuple(dt_TI.shape)} must be [T={T}, I={I}].")
    if B_TK.dim() != 2 or B_TK.shape[0] != T or tuple(C_TK.shape) != tuple(B_TK.shape):
        raise ValueError(f"B_TK {tuple(B_TK.shape)} and C_TK {tuple(C_TK.shape)} must be one shape [T={T}, K].")
    K = B_TK.shape[1]
    if tuple(A_log_IK.shape) != (I, K):
        raise ValueError(f"A_log_IK {tuple(A_log_IK.shape)} must be [I={I}, K={K}].")
    for name, t in (("D_I", D_I), ("dt_bias_I", dt_bias_I)):
        if tuple(t.shape) != (I,):
            raise ValueError(f"{name} {tuple(t.shape)} must be [I={I}].")
    if state_pool_PIK.dim() != 3 or tuple(state_pool_PIK.shape[1:]) != (I, K):
        raise ValueError(f"state_pool_PIK {tuple(state_pool_PIK.shape)} must be [P, I={I}, K={K}].")
    return T, check_batch_args(query_start_loc_S1, slot_ids_S, has_initial_state_S)


def _cdt(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _recur(x_LI, dt_LI, B_LK, C_LK, A_IK, D_I, h_IK, outputs: bool):
    """One sequence's tokens in the compute dtype (dt already discretized): (y_LI or None, the last state)."""
    ys = []
    for t in range(x_LI.shape[0]):
        h_IK = torch.exp(dt_LI[t][:, None] * A_IK) * h_IK + (dt_LI[t] * x_LI[t])[:, None] * B_LK[t][None, :]
        if outputs:
            ys.append(h_IK @ C_LK[t] + D_I * x_LI[t])
    return (torch.stack(ys) if ys else None), h_IK


def _apply(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, pool, query_start_loc_S1, slot_ids_S,
           has_initial_state_S, write, lengths=None):
    cdt = _cdt(x_TI)
    dt = F.softplus(dt_TI.to(cdt) + dt_bias_I.to(cdt))
    A_IK, D = -torch.exp(A_log_IK.to(cdt)), D_I.to(cdt)
    x, B, C = x_TI.to(cdt), B_TK.to(cdt), C_TK.to(cdt)
    qsl = query_start_loc_S1.tolist()  # device -> host sync (the reference's CPU path: already on the host)
    slots = slot_ids_S.tolist()
    reads = [slot >= 0 for slot in slots]
    if has_initial_state_S is not None:
        reads = [r and bool(h) for r, h in zip(reads, has_initial_state_S.tolist())]
    # Every state is read before any is written (the kernels' order).
    inits = [pool[slot].to(cdt) if r else pool.new_zeros(pool.shape[1:], dtype=cdt) for slot, r in zip(slots, reads)]
    y_TI = torch.zeros(x_TI.shape, dtype=x_TI.dtype, device=x_TI.device)
    for s, slot in enumerate(slots):
        a, b = qsl[s], qsl[s + 1]
        if lengths is not None:  # a replay: only the first lengths[s] tokens advance the state
            b = a + max(0, min(b - a, lengths[s]))
        y, h = _recur(x[a:b], dt[a:b], B[a:b], C[a:b], A_IK, D, inits[s], lengths is None)
        if y is not None:
            y_TI[a:b] = y.to(x_TI.dtype)
        if write and slot >= 0:
            pool[slot] = h.to(pool.dtype)
    return y_TI


def reference_mamba1_scan(
    x_TI: torch.Tensor, dt_TI: torch.Tensor, B_TK: torch.Tensor, C_TK: torch.Tensor, A_log_IK: torch.Tensor,
    D_I: torch.Tensor, dt_bias_I: torch.Tensor, state_pool_PIK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, has_initial_state_S: torch.Tensor | None = None,
) -> torch.Tensor:
    """Prefill (any lengths): y_TI (x's dtype), D's skip included, no gate. dt_TI is dt_proj's matmul without its
    bias (dt_bias and softplus applied here). Each sequence starts from its slot's state (zeros where
    has_initial_state_S is False or the slot is -1) and its last state is written back to the slot."""
    check_scan_args(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1,
                    slot_ids_S, has_initial_state_S)
    return _apply(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1, slot_ids_S,
                  has_initial_state_S, True)


def reference_mamba1_decode(
    x_TI: torch.Tensor, dt_TI: torch.Tensor, B_TK: torch.Tensor, C_TK: torch.Tensor, A_log_IK: torch.Tensor,
    D_I: torch.Tensor, dt_bias_I: torch.Tensor, state_pool_PIK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, update_state: bool = True,
) -> torch.Tensor:
    """Decode and speculative verify (a few tokens per sequence): every sequence continues from its slot's state
    (slot -1: a padding row, zeros in, nothing written). update_state=False (a verify step): the pool is read, not
    written; `reference_mamba1_replay` advances it over the accepted tokens."""
    check_scan_args(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1,
                    slot_ids_S)
    return _apply(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1, slot_ids_S,
                  None, update_state)


def reference_mamba1_replay(
    x_TI: torch.Tensor, dt_TI: torch.Tensor, B_TK: torch.Tensor, C_TK: torch.Tensor, A_log_IK: torch.Tensor,
    D_I: torch.Tensor, dt_bias_I: torch.Tensor, state_pool_PIK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, num_accepted_S: torch.Tensor,
) -> None:
    """After a verify step that left the pool untouched: each slot (>= 0) advances over the first num_accepted_S[s]
    tokens of its sequence (the verify step's x, dt, B, C; 0 keeps the state)."""
    check_scan_args(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1,
                    slot_ids_S)
    if tuple(num_accepted_S.shape) != tuple(slot_ids_S.shape):
        raise ValueError(f"num_accepted_S {tuple(num_accepted_S.shape)} must be [S={slot_ids_S.numel()}].")
    _apply(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1, slot_ids_S, None,
           True, lengths=num_accepted_S.tolist())  # device -> host sync (reference only)


def reference_mamba1_recurrence(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, h_IK) -> tuple[torch.Tensor,
                                                                                              torch.Tensor]:
    """One sequence, token by token in float64, each step written out as transformers' slow path writes it (the
    tests' oracle): (y_TI in float64, the last state)."""
    f = torch.float64
    dt = F.softplus(dt_TI.to(f) + dt_bias_I.to(f))
    A = -torch.exp(A_log_IK.to(f))
    h = h_IK.to(f)
    ys = []
    for t in range(x_TI.shape[0]):
        dA = torch.exp(A * dt[t][:, None])
        dBu = dt[t][:, None] * B_TK[t].to(f)[None, :] * x_TI[t].to(f)[:, None]
        h = dA * h + dBu
        ys.append((h * C_TK[t].to(f)[None, :]).sum(-1) + x_TI[t].to(f) * D_I.to(f))
    y = torch.stack(ys) if ys else x_TI.new_zeros(x_TI.shape, dtype=f)
    return y, h


__all__ = ["check_scan_args", "reference_mamba1_decode", "reference_mamba1_recurrence", "reference_mamba1_replay",
           "reference_mamba1_scan"]
