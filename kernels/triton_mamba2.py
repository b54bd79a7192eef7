"""Mamba2's SSM recurrence as one Triton kernel (kernels/mamba2.py is the contract): decode, speculative verify
(states read, not written), the replay of a verify step's accepted tokens (no outputs) and, token by token, prefill.
The short convolution before it is gated DeltaNet's Triton kernel (kernels/triton_causal_conv1d.py): a decode step
is two launches, the convolution's and this one. The conv could not share this launch: B's and C's channels are read
by every head of their group, so one program would overwrite their conv state while another still reads it.

Legend: T tokens, S sequences, P state-pool slots, N heads, H head dim, G groups, K state size; BK = K rounded up to
a power of two, BH head-dim rows per program.

Grid (S, N, H / BH): a program owns rows [hb BH, (hb + 1) BH) of head n's state of sequence s ([BH, K], fp32 in
registers). It reads them from the sequence's slot (zeros for slot -1 or a new sequence), and per token: dt =
softplus(dt + dt_bias) (torch's threshold 20) clamped to [dt_min, dt_max], h = exp(dt A) h + dt x B^T, y = h C + D x,
y stored in the activations' dtype; at the end the rows go back to the slot (not in a verify step). Each program
reads and writes only its own rows: no second pass, no host sync (CUDA-graph safe).

Numerics: fp32 throughout (the reference's float32 path), one rounding of y; the K-sum's order differs from torch's,
so results sit within fp32 rounding of the reference, not bit for bit.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .mamba2 import check_scan_args


def launch_config(kind: str, t: torch.Tensor) -> dict:
    """mamba2.json's config of one kernel kind for kernels on t's device
    (triton_common.launch_config: 'interpreter' for CPU tensors, else 'gpu')."""
    return common.launch_config("mamba2", kind, t)


@triton.jit
def _mamba2_recurrent_kernel(
    x_ptr, dt_ptr, b_ptr, c_ptr, alog_ptr, d_ptr, dtb_ptr, y_ptr, pool_ptr, qsl_ptr, slot_ptr, init_ptr, acc_ptr,
    stride_xt, stride_xn, stride_dtt, stride_bt, stride_bg, stride_ct, stride_cg,
    num_heads, group, head_dim, state_size, dt_min, dt_max,
    BH: tl.constexpr, BK: tl.constexpr, HAS_INIT: tl.constexpr, WRITE: tl.constexpr, REPLAY: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    s = tl.program_id(0)
    n = tl.program_id(1)
    hb = tl.program_id(2)
    start = tl.load(qsl_ptr + s).to(tl.int64)
    end = tl.load(qsl_ptr + s + 1).to(tl.int64)
    if REPLAY:  # the accepted tokens only, no outputs
        end = tl.minimum(end, start + tl.maximum(tl.load(acc_ptr + s).to(tl.int64), 0))
    slot = tl.load(slot_ptr + s).to(tl.int64)
    read = slot >= 0
    if HAS_INIT:
        read = read & (tl.load(init_ptr + s) != 0)
    hh = hb * BH + tl.arange(0, BH)
    kk = tl.arange(0, BK)
    h_ok = hh < head_dim
    k_ok = kk < state_size
    tile_ok = h_ok[:, None] & k_ok[None, :]
    tile = hh[:, None] * state_size + kk[None, :]
    state_base = (slot * num_heads + n) * head_dim * state_size
    # (a scalar condition joins a tile mask through tl.where: `tile & scalar` fails in the interpreter)
    h = tl.load(pool_ptr + state_base + tile, mask=tl.where(read, tile_ok, False), other=0.0).to(tl.float32)
    A = -tl.exp(tl.load(alog_ptr + n).to(tl.float32))
    D = tl.load(d_ptr + n).to(tl.float32)
    dt_bias = tl.load(dtb_ptr + n).to(tl.float32)
    g = n // group
    x_base = x_ptr + n * stride_xn + hh
    b_base = b_ptr + g * stride_bg + kk
    c_base = c_ptr + g * stride_cg + kk
    ydt = y_ptr.dtype.element_ty
    for j in range(0, end - start):
        t = start + j  # an int64 tensor (the loop variable itself is a plain int in the interpreter)
        v = tl.load(dt_ptr + t * stride_dtt + n).to(tl.float32) + dt_bias
        dt = tl.where(v > 20.0, v, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))))
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        x = tl.load(x_base + t * stride_xt, mask=h_ok, other=0.0).to(tl.float32)
        B = tl.load(b_base + t * stride_bt, mask=k_ok, other=0.0).to(tl.float32)
        h = h * tl.exp(dt * A) + (dt * x)[:, None] * B[None, :]
        if not REPLAY:
            C = tl.load(c_base + t * stride_ct, mask=k_ok, other=0.0).to(tl.float32)
            y = tl.sum(h * C[None, :], axis=1) + D * x
            tl.store(y_ptr + (t * num_heads + n) * head_dim + hh, common.cast(y, ydt, INTERPRET), mask=h_ok)
    if WRITE:
        tl.store(pool_ptr + state_base + tile, h, mask=tl.where(slot >= 0, tile_ok, False))


def _launch(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1, slot_ids_S,
            has_initial_state_S, dt_min, dt_max, write, num_accepted_S=None, out=None):
    T, S = check_scan_args(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK,
                           query_start_loc_S1, slot_ids_S, has_initial_state_S)
    N, H = x_TNH.shape[1:]
    G, K = B_TGK.shape[1:]
    common.check_dtype("x_TNH", x_TNH)
    if state_pool_PNHK.dtype != torch.float32 or not state_pool_PNHK.is_contiguous():
        raise ValueError(f"state_pool_PNHK {state_pool_PNHK.dtype} is invalid: the Triton kernel takes a contiguous "
                         "float32 pool.")
    x_TNH, dt_TN, B_TGK, C_TGK = (t if t.stride(-1) == 1 else t.contiguous() for t in (x_TNH, dt_TN, B_TGK, C_TGK))
    replay = num_accepted_S is not None
    y = common.out_buffer(out, "out", (0 if replay else T, N, H), x_TNH.dtype, x_TNH.device)
    if S == 0:
        return y
    cfg = launch_config("recurrent", x_TNH)
    BH = min(cfg["BLOCK_H"], triton.next_power_of_2(H))
    _mamba2_recurrent_kernel[(S, N, triton.cdiv(H, BH))](
        x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, y, state_pool_PNHK, query_start_loc_S1, slot_ids_S,
        has_initial_state_S if has_initial_state_S is not None else slot_ids_S,
        num_accepted_S if replay else slot_ids_S,
        x_TNH.stride(0), x_TNH.stride(1), dt_TN.stride(0), B_TGK.stride(0), B_TGK.stride(1), C_TGK.stride(0),
        C_TGK.stride(1), N, N // G, H, K, float(dt_min), float(min(dt_max, 3.0e38)),
        BH=BH, BK=triton.next_power_of_2(K), HAS_INIT=has_initial_state_S is not None, WRITE=write, REPLAY=replay,
        INTERPRET=common.interpreting(x_TNH), num_warps=cfg["num_warps"],
    )
    return y


def triton_mamba2_scan(
    x_TNH: torch.Tensor, dt_TN: torch.Tensor, B_TGK: torch.Tensor, C_TGK: torch.Tensor, A_log_N: torch.Tensor,
    D_N: torch.Tensor, dt_bias_N: torch.Tensor, state_pool_PNHK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, has_initial_state_S: torch.Tensor | None = None, dt_min: float = 0.0,
    dt_max: float = math.inf, *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_mamba2_scan`: the recurrence over every token, one launch (a chunked-scan kernel,
    mamba_ssm's, is the fast path for long prompts: not wired here)."""
    return _launch(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1,
                   slot_ids_S, has_initial_state_S, dt_min, dt_max, True, out=out)


def triton_mamba2_decode(
    x_TNH: torch.Tensor, dt_TN: torch.Tensor, B_TGK: torch.Tensor, C_TGK: torch.Tensor, A_log_N: torch.Tensor,
    D_N: torch.Tensor, dt_bias_N: torch.Tensor, state_pool_PNHK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, dt_min: float = 0.0, dt_max: float = math.inf, update_state: bool = True, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_mamba2_decode`, one launch, no host sync."""
    return _launch(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1,
                   slot_ids_S, None, dt_min, dt_max, update_state, out=out)


def triton_mamba2_replay(
    x_TNH: torch.Tensor, dt_TN: torch.Tensor, B_TGK: torch.Tensor, C_TGK: torch.Tensor, A_log_N: torch.Tensor,
    D_N: torch.Tensor, dt_bias_N: torch.Tensor, state_pool_PNHK: torch.Tensor, query_start_loc_S1: torch.Tensor,
    slot_ids_S: torch.Tensor, num_accepted_S: torch.Tensor, dt_min: float = 0.0, dt_max: float = math.inf,
) -> None:
    """Same contract as `reference_mamba2_replay`: each sequence's first num_accepted_S[s] tokens, no outputs, the
    state written back; one launch, no host sync."""
    if tuple(num_accepted_S.shape) != tuple(slot_ids_S.shape):
        raise ValueError(f"num_accepted_S {tuple(num_accepted_S.shape)} must be [S={slot_ids_S.numel()}].")
    _launch(x_TNH, dt_TN, B_TGK, C_TGK, A_log_N, D_N, dt_bias_N, state_pool_PNHK, query_start_loc_S1, slot_ids_S,
            None, dt_min, dt_max, True, num_accepted_S)


__all__ = ["triton_mamba2_decode", "triton_mamba2_replay", "triton_mamba2_scan"]
