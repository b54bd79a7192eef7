"""The gated delta rule's recurrent kernel (kernels/gated_delta.py is the contract): decode, speculative verify and,
without fla, prefill, and the replay of a verify step's accepted tokens (the same loop, no outputs); the commit of
kept intermediate states; the gates.

Legend: T tokens, S sequences, P state-pool slots, G q/k heads, N value heads, K q/k head dim, V value head dim,
Q intermediate states kept per sequence; BK = K rounded up to a power of two, BV value columns per program.

Grid (S, N, V / BV): a program owns value columns [vb BV, (vb + 1) BV) of value head n of sequence s. It reads that
[K, BV] slice of the sequence's fp32 state from its slot (zeros for slot -1 or a new sequence), runs the
sequence's tokens one after the other with the state in registers (l2norm of q and k, the scale, the decay and the
delta-rule update fused; q/k re-normed by each of the V / BV programs of a head, K values each), writes o per token
and, at the end, the state back to the slot, or, keeping intermediates, the state after each token to the
caller's buffer and nothing to the pool. Each program reads and writes only its own slice, so the pool needs no
second pass. Prefill runs the same loop over the whole prompt (fla's chunked kernels are the fast path for long
prompts where fla-core is installed: kernels/fla_gated_delta.py). A per-channel decay (Kimi Delta Attention: g
[T, N, K], PER_CHANNEL) scales each key row of the slice by its own factor; the per-head one (gated DeltaNet) compiles
as before.

Numerics: fp32 throughout (the reference's float32 path), one rounding of o to the activations' dtype; the order
of the K-sums differs from torch's, so results sit within fp32 rounding of the reference, not bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .gated_delta import L2NORM_EPS, check_gdn_args

_EPS = tl.constexpr(L2NORM_EPS)


def launch_config(kind: str, t: torch.Tensor) -> dict:
    """gated_delta.json's config of one kernel kind ('recurrent', 'conv', 'conv_update', 'commit', 'gating') for
    kernels on t's device (triton_common.launch_config: 'interpreter' for CPU tensors, else 'gpu')."""
    return common.launch_config("gated_delta", kind, t)


@triton.jit
def _gdn_recurrent_kernel(
    q_ptr, k_ptr, v_ptr, g_ptr, beta_ptr, o_ptr, pool_ptr, inter_ptr, qsl_ptr, slot_ptr, init_ptr, acc_ptr,
    stride_qt, stride_qg, stride_kt, stride_kg, stride_vt, stride_vn, stride_gt, stride_gn, stride_bt,
    num_v_heads, group, key_dim, value_dim, keep, scale,
    BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr, KEEP: tl.constexpr, REPLAY: tl.constexpr,
    PER_CHANNEL: tl.constexpr, INTERPRET: tl.constexpr,
):
    s = tl.program_id(0)
    n = tl.program_id(1)
    vb = tl.program_id(2)
    start = tl.load(qsl_ptr + s).to(tl.int64)
    end = tl.load(qsl_ptr + s + 1).to(tl.int64)
    if REPLAY:  # the accepted tokens only, no outputs: the state moves to where the sampler stopped
        end = tl.minimum(end, start + tl.maximum(tl.load(acc_ptr + s).to(tl.int64), 0))
    slot = tl.load(slot_ptr + s).to(tl.int64)
    read = slot >= 0
    if HAS_INIT:
        read = read & (tl.load(init_ptr + s) != 0)
    kk = tl.arange(0, BK)
    vv = vb * BV + tl.arange(0, BV)
    k_ok = kk < key_dim
    v_ok = vv < value_dim
    kv_ok = k_ok[:, None] & v_ok[None, :]
    tile = kk[:, None] * value_dim + vv[None, :]
    state_base = (slot * num_v_heads + n) * key_dim * value_dim
    # (a scalar condition joins a tile mask through tl.where: `tile & scalar` fails in the interpreter)
    h = tl.load(pool_ptr + state_base + tile, mask=tl.where(read, kv_ok, False), other=0.0).to(tl.float32)
    gq = n // group
    q_base = q_ptr + gq * stride_qg + kk
    k_base = k_ptr + gq * stride_kg + kk
    v_base = v_ptr + n * stride_vn + vv
    dt = o_ptr.dtype.element_ty
    for j in range(0, end - start):
        t = start + j  # an int64 tensor (the loop variable itself is a plain int in the interpreter)
        q = tl.load(q_base + t * stride_qt, mask=k_ok, other=0.0).to(tl.float32)
        k = tl.load(k_base + t * stride_kt, mask=k_ok, other=0.0).to(tl.float32)
        v = tl.load(v_base + t * stride_vt, mask=v_ok, other=0.0).to(tl.float32)
        if PER_CHANNEL:  # Kimi Delta Attention: each key row of the state decays by its own factor
            g = tl.load(g_ptr + t * stride_gt + n * stride_gn + kk, mask=k_ok, other=0.0).to(tl.float32)
        else:
            g = tl.load(g_ptr + t * stride_gt + n).to(tl.float32)
        beta = tl.load(beta_ptr + t * stride_bt + n).to(tl.float32)
        q = q * (scale / tl.sqrt(tl.sum(q * q, axis=0) + _EPS))
        k = k / tl.sqrt(tl.sum(k * k, axis=0) + _EPS)
        if PER_CHANNEL:
            h = h * tl.exp(g)[:, None]
        else:
            h = h * tl.exp(g)
        delta = (v - tl.sum(h * k[:, None], axis=0)) * beta
        h = h + k[:, None] * delta[None, :]
        o = tl.sum(h * q[:, None], axis=0)
        if not REPLAY:
            tl.store(o_ptr + (t * num_v_heads + n) * value_dim + vv, common.cast(o, dt, INTERPRET), mask=v_ok)
        if KEEP:
            row = (s.to(tl.int64) * keep + j) * num_v_heads + n
            tl.store(inter_ptr + row * key_dim * value_dim + tile, h, mask=tl.where(j < keep, kv_ok, False))
    if not KEEP:
        tl.store(pool_ptr + state_base + tile, h, mask=tl.where(slot >= 0, kv_ok, False))


def _launch_recurrent(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S,
                      has_initial_state_S, intermediate_states_SQNKV, scale, out, num_accepted_S=None):
    T, S, G, N, K, V = check_gdn_args(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1,
                                      slot_ids_S, has_initial_state_S, intermediate_states_SQNKV)
    common.check_dtype("q_TGK", q_TGK)
    if k_TGK.dtype != q_TGK.dtype or v_TNV.dtype != q_TGK.dtype:
        raise ValueError(f"k_TGK.dtype={k_TGK.dtype} and v_TNV.dtype={v_TNV.dtype} must match q_TGK.dtype={q_TGK.dtype}.")
    if state_pool_PNKV.dtype != torch.float32 or not state_pool_PNKV.is_contiguous():
        raise ValueError(f"state_pool_PNKV {state_pool_PNKV.dtype} is invalid: the Triton kernels take a contiguous "
                         "float32 pool.")
    if intermediate_states_SQNKV is not None and not intermediate_states_SQNKV.is_contiguous():
        raise ValueError("intermediate_states_SQNKV must be contiguous.")
    q_TGK, k_TGK, v_TNV, g_TN, beta_TN = (x if x.stride(-1) == 1 else x.contiguous()
                                          for x in (q_TGK, k_TGK, v_TNV, g_TN, beta_TN))
    replay = num_accepted_S is not None
    if replay:  # no outputs: a 0-row stand-in for the (unused) output pointer
        out = common.workspace((0, N, V), q_TGK.dtype, q_TGK.device)
    out = out if out is not None else common.workspace((T, N, V), q_TGK.dtype, q_TGK.device)
    if (not replay and tuple(out.shape) != (T, N, V)) or out.dtype != q_TGK.dtype or not out.is_contiguous():
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be contiguous {(T, N, V)} {q_TGK.dtype}.")
    if S == 0:
        return out
    cfg = launch_config("recurrent", q_TGK)
    BV = min(cfg["BLOCK_V"], triton.next_power_of_2(V))
    keep = intermediate_states_SQNKV.shape[1] if intermediate_states_SQNKV is not None else 0
    _gdn_recurrent_kernel[(S, N, triton.cdiv(V, BV))](
        q_TGK, k_TGK, v_TNV, g_TN, beta_TN, out, state_pool_PNKV,
        intermediate_states_SQNKV if keep else state_pool_PNKV, query_start_loc_S1, slot_ids_S,
        has_initial_state_S if has_initial_state_S is not None else slot_ids_S,
        num_accepted_S if replay else slot_ids_S,
        q_TGK.stride(0), q_TGK.stride(1), k_TGK.stride(0), k_TGK.stride(1), v_TNV.stride(0), v_TNV.stride(1),
        g_TN.stride(0), g_TN.stride(1), beta_TN.stride(0), N, N // G, K, V, keep,
        float(K ** -0.5 if scale is None else scale),
        BK=triton.next_power_of_2(K), BV=BV, HAS_INIT=has_initial_state_S is not None,
        KEEP=intermediate_states_SQNKV is not None, REPLAY=replay, PER_CHANNEL=g_TN.dim() == 3,
        INTERPRET=common.interpreting(q_TGK),
        num_warps=cfg["num_warps"],
    )
    return out


def triton_gated_delta_rule(
    q_TGK: torch.Tensor, k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor, beta_TN: torch.Tensor,
    state_pool_PNKV: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
    has_initial_state_S: torch.Tensor | None = None, scale: float | None = None, *, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_gated_delta_rule`, one launch (the recurrence over every token); q, k, v, g and
    beta may be strided views with a unit last stride; the pool must be contiguous float32."""
    return _launch_recurrent(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S,
                             has_initial_state_S, None, scale, out)


def triton_gated_delta_rule_decode(
    q_TGK: torch.Tensor, k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor, beta_TN: torch.Tensor,
    state_pool_PNKV: torch.Tensor, query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor,
    intermediate_states_SQNKV: torch.Tensor | None = None, scale: float | None = None, *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same contract as `reference_gated_delta_rule_decode`, one launch, no host sync (CUDA-graph safe)."""
    return _launch_recurrent(q_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S,
                             None, intermediate_states_SQNKV, scale, out)


def triton_replay_gated_delta_state(
    k_TGK: torch.Tensor, v_TNV: torch.Tensor, g_TN: torch.Tensor, beta_TN: torch.Tensor, state_pool_PNKV: torch.Tensor,
    query_start_loc_S1: torch.Tensor, slot_ids_S: torch.Tensor, num_accepted_S: torch.Tensor,
) -> None:
    """Same contract as `reference_replay_gated_delta_state`: the recurrent kernel over each sequence's first
    num_accepted_S[s] tokens, no outputs, the state written back; one launch, no host sync."""
    if tuple(num_accepted_S.shape) != tuple(slot_ids_S.shape):
        raise ValueError(f"num_accepted_S {tuple(num_accepted_S.shape)} must be [S={slot_ids_S.shape[0]}].")
    _launch_recurrent(k_TGK, k_TGK, v_TNV, g_TN, beta_TN, state_pool_PNKV, query_start_loc_S1, slot_ids_S, None, None,
                      None, None, num_accepted_S)


@triton.jit
def _commit_kernel(pool_ptr, inter_ptr, slot_ptr, acc_ptr, numel, keep, BLOCK: tl.constexpr):
    s = tl.program_id(0)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    slot = tl.load(slot_ptr + s).to(tl.int64)
    n = tl.load(acc_ptr + s).to(tl.int64)
    ok = tl.where((slot >= 0) & (n >= 1) & (n <= keep), offs < numel, False)
    src = (s.to(tl.int64) * keep + n - 1) * numel
    x = tl.load(inter_ptr + src + offs, mask=ok)
    tl.store(pool_ptr + slot * numel + offs, x, mask=ok)


def triton_commit_states(pool_PX: torch.Tensor, slot_ids_S: torch.Tensor, intermediate_states_SQX: torch.Tensor,
                         num_accepted_S: torch.Tensor) -> None:
    """Same contract as `reference_commit_states`, one launch, no host sync; pool and buffer contiguous, one dtype."""
    if intermediate_states_SQX.shape[0] != slot_ids_S.shape[0] or intermediate_states_SQX.shape[2:] != pool_PX.shape[1:]:
        raise ValueError(f"intermediate_states_SQX {tuple(intermediate_states_SQX.shape)} must be "
                         f"[S={slot_ids_S.shape[0]}, Q, *{tuple(pool_PX.shape[1:])}] (the pool's trailing shape).")
    if tuple(num_accepted_S.shape) != tuple(slot_ids_S.shape):
        raise ValueError(f"num_accepted_S {tuple(num_accepted_S.shape)} must be [S={slot_ids_S.shape[0]}].")
    if (not pool_PX.is_contiguous() or not intermediate_states_SQX.is_contiguous()
            or pool_PX.dtype != intermediate_states_SQX.dtype):
        raise ValueError(f"pool_PX ({pool_PX.dtype}) and intermediate_states_SQX ({intermediate_states_SQX.dtype}) must "
                         "be contiguous and of one dtype.")
    S, Q = intermediate_states_SQX.shape[:2]
    numel = pool_PX[0].numel() if pool_PX.shape[0] else intermediate_states_SQX[0, 0].numel() if S and Q else 0
    if S == 0 or Q == 0 or numel == 0:
        return
    cfg = launch_config("commit", pool_PX)
    BLOCK = min(cfg["BLOCK"], triton.next_power_of_2(numel))
    _commit_kernel[(S, triton.cdiv(numel, BLOCK))](pool_PX, intermediate_states_SQX, slot_ids_S, num_accepted_S, numel,
                                                   Q, BLOCK=BLOCK, num_warps=cfg["num_warps"])


@triton.jit
def _gating_kernel(a_ptr, b_ptr, alog_ptr, dtb_ptr, g_ptr, beta_ptr, total, num_v_heads, stride_at, stride_bt,
                   BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < total
    t = offs // num_v_heads
    n = offs % num_v_heads
    a = tl.load(a_ptr + t * stride_at + n, mask=ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + t * stride_bt + n, mask=ok, other=0.0).to(tl.float32)
    x = a + tl.load(dtb_ptr + n, mask=ok, other=0.0).to(tl.float32)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))  # torch's threshold 20
    g = -tl.exp(tl.load(alog_ptr + n, mask=ok, other=0.0).to(tl.float32)) * softplus
    tl.store(g_ptr + offs, g, mask=ok)
    tl.store(beta_ptr + offs, common.cast(1.0 / (1.0 + tl.exp(-b)), beta_ptr.dtype.element_ty, INTERPRET), mask=ok)


def triton_gdn_gating(a_TN: torch.Tensor, b_TN: torch.Tensor, A_log_N: torch.Tensor,
                      dt_bias_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference_gdn_gating`, one launch: (g_TN float32, beta_TN of b's dtype). a and b may be
    strided row views (the halves of in_proj_ba's output, after the models' head reordering)."""
    common.check_dtype("b_TN", b_TN)
    if a_TN.dim() != 2 or b_TN.shape != a_TN.shape:
        raise ValueError(f"a_TN {tuple(a_TN.shape)} and b_TN {tuple(b_TN.shape)} must both be [T, N].")
    T, N = a_TN.shape
    for name, p in (("A_log_N", A_log_N), ("dt_bias_N", dt_bias_N)):
        if tuple(p.shape) != (N,):
            raise ValueError(f"{name} {tuple(p.shape)} must be [N={N}].")
    a_TN, b_TN = (x if x.stride(-1) == 1 else x.contiguous() for x in (a_TN, b_TN))
    g_TN = common.workspace((T, N), torch.float32, a_TN.device)
    beta_TN = common.workspace((T, N), b_TN.dtype, b_TN.device)
    if T == 0:
        return g_TN, beta_TN
    cfg = launch_config("gating", a_TN)
    BLOCK = min(cfg["BLOCK"], triton.next_power_of_2(T * N))
    _gating_kernel[(triton.cdiv(T * N, BLOCK),)](
        a_TN, b_TN, A_log_N.contiguous(), dt_bias_N.contiguous(), g_TN, beta_TN, T * N, N, a_TN.stride(0),
        b_TN.stride(0), BLOCK=BLOCK, INTERPRET=common.interpreting(a_TN), num_warps=cfg["num_warps"])
    return g_TN, beta_TN
