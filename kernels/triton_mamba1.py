"""Mamba1's selective scan as one Triton kernel (kernels/mamba1.py is the contract): decode, speculative verify
(states read, not written), the replay of a verify step's accepted tokens (no outputs) and, token by token, prefill.
The short convolution before it is gated DeltaNet's Triton kernel (kernels/triton_causal_conv1d.py), as Mamba2's.

Legend: T tokens, S sequences, P state-pool slots, I channels, K state size; BK = K rounded up to a power of two,
BI channels per program.

Grid (S, I / BI): a program owns channels [ib BI, (ib + 1) BI) of sequence s's state ([BI, K], fp32 in registers)
and their decays A = -exp(A_log) ([BI, K]). It reads the rows from the sequence's slot (zeros for slot -1 or a new
sequence), and per token: dt = softplus(dt + dt_bias) (torch's threshold 20), h = exp(dt A) h + dt x B^T,
y = h C + D x, y stored in the activations' dtype; at the end the rows go back to the slot (not in a verify step).
Each program reads and writes only its own rows: no host sync (CUDA-graph safe).

Numerics: fp32 throughout (the reference's float32 path), one rounding of y; the K-sum's order differs from torch's,
so results sit within fp32 rounding of the reference, not bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .mamba1 import check_scan_args


def launch_config(kind: str, t: torch.Tensor) -> dict:
    """mamba1.json's config of one kernel kind for kernels on t's device
    (triton_common.launch_config: 'interpreter' for CPU tensors, else 'gpu')."""
    return common.launch_config("mamba1", kind, t)


@triton.jit
def _mamba1_recurrent_kernel(
    x_ptr, dt_ptr, b_ptr, c_ptr, alog_ptr, d_ptr, dtb_ptr, y_ptr, pool_ptr, qsl_ptr, slot_ptr, init_ptr, acc_ptr,
    stride_xt, stride_dtt, stride_bt, stride_ct, channels, state_size,
    BI: tl.constexpr, BK: tl.constexpr, HAS_INIT: tl.constexpr, WRITE: tl.constexpr, REPLAY: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    s = tl.program_id(0)
    ib = tl.program_id(1)
    start = tl.load(qsl_ptr + s).to(tl.int64)
    end = tl.load(qsl_ptr + s + 1).to(tl.int64)
    if REPLAY:  # the accepted tokens only, no outputs
        end = tl.minimum(end, start + tl.maximum(tl.load(acc_ptr + s).to(tl.int64), 0))
    slot = tl.load(slot_ptr + s).to(tl.int64)
    read = slot >= 0
    if HAS_INIT:
        read = read & (tl.load(init_ptr + s) != 0)
    ii = ib * BI + tl.arange(0, BI)
    kk = tl.arange(0, BK)
    i_ok = ii < channels
    k_ok = kk < state_size
    tile_ok = i_ok[:, None] & k_ok[None, :]
    tile = ii[:, None] * state_size + kk[None, :]
    state_base = slot * channels * state_size
    # (a scalar condition joins a tile mask through tl.where: `tile & scalar` fails in the interpreter)
    h = tl.load(pool_ptr + state_base + tile, mask=tl.where(read, tile_ok, False), other=0.0).to(tl.float32)
    A = -tl.exp(tl.load(alog_ptr + tile, mask=tile_ok, other=0.0).to(tl.float32))
    D = tl.load(d_ptr + ii, mask=i_ok, other=0.0).to(tl.float32)
    dt_bias = tl.load(dtb_ptr + ii, mask=i_ok, other=0.0).to(tl.float32)
    ydt = y_ptr.dtype.element_ty
    for j in range(0, end - start):
        t = start + j  # an int64 tensor (the loop variable itself is a plain int in the interpreter)
        v = tl.load(dt_ptr + t * stride_dtt + ii, mask=i_ok, other=0.0).to(tl.float32) + dt_bias
        dt = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))
        x = tl.load(x_ptr + t * stride_xt + ii, mask=i_ok, other=0.0).to(tl.float32)
        B = tl.load(b_ptr + t * stride_bt + kk, mask=k_ok, other=0.0).to(tl.float32)
        h = h * tl.exp(dt[:, None] * A) + (dt * x)[:, None] * B[None, :]
        if not REPLAY:
            C = tl.load(c_ptr + t * stride_ct + kk, mask=k_ok, other=0.0).to(tl.float32)
            y = tl.sum(h * C[None, :], axis=1) + D * x
            tl.store(y_ptr + t * channels + ii, common.cast(y, ydt, INTERPRET), mask=i_ok)
    if WRITE:
        tl.store(pool_ptr + state_base + tile, h, mask=tl.where(slot >= 0, tile_ok, False))


def _launch(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1, slot_ids_S,
            has_initial_state_S, write, num_accepted_S=None, out=None):
    T, S = check_scan_args(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1,
                           slot_ids_S, has_initial_state_S)
    I, K = A_log_IK.shape
    common.check_dtype("x_TI", x_TI)
    if state_pool_PIK.dtype != torch.float32 or not state_pool_PIK.is_contiguous():
        raise ValueError(f"state_pool_PIK {state_pool_PIK.dtype} is invalid: the Triton kernel takes a contiguous "
                         "float32 pool.")
    x_TI, dt_TI, B_TK, C_TK = (t if t.stride(-1) == 1 else t.contiguous() for t in (x_TI, dt_TI, B_TK, C_TK))
    A_log_IK, D_I, dt_bias_I = A_log_IK.contiguous(), D_I.contiguous(), dt_bias_I.contiguous()
    replay = num_accepted_S is not None
    y = common.out_buffer(out, "out", (0 if replay else T, I), x_TI.dtype, x_TI.device)
    if S == 0:
        return y
    cfg = launch_config("recurrent", x_TI)
    BI = min(cfg["BLOCK_I"], triton.next_power_of_2(I))
    _mamba1_recurrent_kernel[(S, triton.cdiv(I, BI))](
        x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, y, state_pool_PIK, query_start_loc_S1, slot_ids_S,
        has_initial_state_S if has_initial_state_S is not None else slot_ids_S,
        num_accepted_S if replay else slot_ids_S,
        x_TI.stride(0), dt_TI.stride(0), B_TK.stride(0), C_TK.stride(0), I, K,
        BI=BI, BK=triton.next_power_of_2(K), HAS_INIT=has_initial_state_S is not None, WRITE=write, REPLAY=replay,
        INTERPRET=common.interpreting(x_TI), num_warps=cfg["num_warps"],
    )
    return y


def triton_mamba1_scan(
    x_TI: torch.Tensor, dt_TI: torch.Tensor, B_TK: torch.Tensor, C_TK: torch.Tensor, A_log_IK: torch.Tensor,
    D_I: torch.Tensor, dt_bias_I: torch.Tensor, state_pool_PIK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, has_initial_state_S: torch.Tensor | None = None, *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_mamba1_scan`: the recurrence over every token, one launch."""
    return _launch(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1, slot_ids_S,
                   has_initial_state_S, True, out=out)


def triton_mamba1_decode(
    x_TI: torch.Tensor, dt_TI: torch.Tensor, B_TK: torch.Tensor, C_TK: torch.Tensor, A_log_IK: torch.Tensor,
    D_I: torch.Tensor, dt_bias_I: torch.Tensor, state_pool_PIK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, update_state: bool = True, *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_mamba1_decode`, one launch, no host sync."""
    return _launch(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1, slot_ids_S,
                   None, update_state, out=out)


def triton_mamba1_replay(
    x_TI: torch.Tensor, dt_TI: torch.Tensor, B_TK: torch.Tensor, C_TK: torch.Tensor, A_log_IK: torch.Tensor,
    D_I: torch.Tensor, dt_bias_I: torch.Tensor, state_pool_PIK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, num_accepted_S: torch.Tensor,
) -> None:
    """Same contract as `reference_mamba1_replay`: each sequence's first num_accepted_S[s] tokens, no outputs, the
    state written back; one launch, no host sync."""
    if tuple(num_accepted_S.shape) != tuple(slot_ids_S.shape):
        raise ValueError(f"num_accepted_S {tuple(num_accepted_S.shape)} must be [S={slot_ids_S.numel()}].")
    _launch(x_TI, dt_TI, B_TK, C_TK, A_log_IK, D_I, dt_bias_I, state_pool_PIK, query_start_loc_S1, slot_ids_S, None,
            True, num_accepted_S)


__all__ = ["triton_mamba1_decode", "triton_mamba1_replay", "triton_mamba1_scan"]
