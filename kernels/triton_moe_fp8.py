"""Fused MoE experts with FP8 block-scaled weights and W8A8 activations, in Triton.

Legend: T tokens, D hidden, E local experts, G global experts, I expert intermediate size, F = U + I rows of
gate [0, I) and up [U, U + I) (U = I stacked, or I rounded up to Bn: fp8.reference_fused_moe_fp8), K top-k,
P = T*K pairs, R padded rows (moe_align), Gd = ceil(D / Bk), Gi = ceil(I / Bk) activation groups per row,
Bn x Bk the weight block (128 x 128 published). Same contract as fp8.reference_fused_moe_fp8.

Data flow (the bf16 fused MoE's, kernels/triton_moe.py, with scales):
1. x is quantized once per token (triton_fp8.triton_per_token_group_quant): xq [T, D] fp8, xs [T, Gd].
2. `moe_align_block_size`: pairs sorted by expert, each expert's run padded to BLOCK_M (shared with bf16).
3. Gate-up GEMM over blocks of sorted rows, A rows gathered from xq by `pair // K`. Each K step (BLOCK_K ≤ Bk,
   inside one scale group) is an fp8 dot into a fresh fp32 tile, scaled by the token's xs and the column's
   w13 scale and added to the fp32 accumulators (gate and up). The epilogue computes SiLU(gate)·up in fp32
   and quantizes it right there, per row per Bk columns: BLOCK_N is a multiple of Bk, so a program holds
   whole quantization groups and neither the fp32 nor a bf16 h ever reaches memory (vLLM and SGLang write h
   in bf16 and quantize it in a second pass; rounding h to bf16 first would also move it off the reference).
   Out: hq_RI fp8 and hs_RGi, in sorted row order.
4. Down GEMM: hq × w2qᵀ with hs and the w2 scales per K step, times the routed weight in the epilogue;
   one row per pair then the bf16 kernel's top-k sum (deterministic), or fp32 atomics ("atomic").
The config's PERSISTENT and TMA keys work as in the bf16 kernels (kernels/moe_schedule.py): a persistent tile
loop over the live blocks, and weight tiles (and the down GEMM's sorted hq rows) through tensor descriptors.
No device→host sync: grids come from shapes only.
"""
from __future__ import annotations

from pathlib import Path

import torch
import triton
import triton.language as tl

from . import moe_config
from . import triton_common as common
from .fp8 import DEFAULT_BLOCK, up_row
from .moe_align import moe_align_block_size
from .moe_config import CONFIG_DIR, MoELaunchConfig, _pick, load_config_file
from .triton_fp8 import check_fp8_weight, check_triton_block, quant_tile, triton_per_token_group_quant
from .moe_schedule import _grouped_pids, _tile_pids, gemm_grid, tma_ok
from .triton_moe import _moe_sum_kernel


@triton.jit
def _fp8_up_tile(pid_m, pid_n, x_ptr, xs_ptr, w_ptr, w_desc, ws_ptr, h_ptr, hs_ptr, sorted_ptr, expert_ids_ptr,
                 num_pairs, inter, up_row, hidden, top_k,
                 stride_xt, stride_xst, stride_we, stride_wf, stride_wse, stride_wsf, stride_hr, stride_hsr,
                 SCALE_N: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr):
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair_m = tl.load(sorted_ptr + offs_m)
        row_ok = pair_m < num_pairs
        tok_m = (pair_m // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        offs_k = tl.arange(0, BLOCK_K)
        e64 = expert.to(tl.int64)
        a_ptrs = x_ptr + tok_m[:, None] * stride_xt + offs_k[None, :]
        as_ptrs = xs_ptr + tok_m * stride_xst
        g_ptrs = w_ptr + e64 * stride_we + offs_n[None, :].to(tl.int64) * stride_wf + offs_k[:, None]
        u_ptrs = g_ptrs + up_row * stride_wf
        # Gate row n and up row U+n have their own scale rows: (U + n) // Bn need not be n // Bn + const.
        gs_ptrs = ws_ptr + e64 * stride_wse + (offs_n // SCALE_N) * stride_wsf
        us_ptrs = ws_ptr + e64 * stride_wse + ((up_row + offs_n) // SCALE_N) * stride_wsf
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_ok = offs_k < hidden - k0
            kg = k0 // GROUP
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if TMA:  # w13 as [E, 2, I, D], up at row U (as the bf16 kernel): rows past I, columns past D read as 0
                bg = tl.trans(tl.reshape(w_desc.load([expert, 0, pid_n * BLOCK_N, k0]), [BLOCK_N, BLOCK_K]))
                bu = tl.trans(tl.reshape(w_desc.load([expert, 1, pid_n * BLOCK_N, k0]), [BLOCK_N, BLOCK_K]))
            else:
                bg = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                bu = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a_s = tl.load(as_ptrs + kg, mask=row_ok, other=0.0)
            g_s = tl.load(gs_ptrs + kg, mask=n_ok, other=0.0)
            u_s = tl.load(us_ptrs + kg, mask=n_ok, other=0.0)
            acc_g += tl.dot(a, bg, out_dtype=tl.float32) * a_s[:, None] * g_s[None, :]
            acc_u += tl.dot(a, bu, out_dtype=tl.float32) * a_s[:, None] * u_s[None, :]
            a_ptrs += BLOCK_K
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        # Columns past I hold exact zeros (masked weights, zero scales), so they never raise a group's amax.
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
        GROUPS: tl.constexpr = BLOCK_N // GROUP
        hq, hs = quant_tile(h, GROUPS, GROUP, INTERPRET)
        rows = offs_m.to(tl.int64)
        tl.store(h_ptr + rows[:, None] * stride_hr + offs_n[None, :], hq, mask=n_ok[None, :])
        offs_g = pid_n * GROUPS + tl.arange(0, GROUPS)
        tl.store(hs_ptr + rows[:, None] * stride_hsr + offs_g[None, :], hs, mask=offs_g[None, :] * GROUP < inter)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_fp8_up_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, hs_ptr, sorted_ptr, expert_ids_ptr, num_rows_ptr,
                       num_pairs, num_rows, num_experts, inter, up_row, hidden, top_k,
                       stride_xt, stride_xst, stride_we, stride_wf, stride_wse, stride_wsf, stride_hr, stride_hsr,
                       SCALE_N: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       PERSISTENT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr):
    if TMA:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts, 2, inter, hidden],
                                           strides=[stride_we, up_row * stride_wf, stride_wf, 1],
                                           block_shape=[1, 1, BLOCK_N, BLOCK_K])
    else:
        w_desc = w_ptr  # (unused)
    num_pid_n = tl.cdiv(inter, BLOCK_N)
    if PERSISTENT:  # (kernels/moe_schedule.py: the live tiles only, strided over the programs)
        live_m = tl.load(num_rows_ptr) // BLOCK_M
        for tile in range(tl.program_id(0), live_m * num_pid_n, tl.num_programs(0)):
            pid_m, pid_n = _tile_pids(tile, live_m, num_pid_n, GROUP_M)
            _fp8_up_tile(pid_m, pid_n, x_ptr, xs_ptr, w_ptr, w_desc, ws_ptr, h_ptr, hs_ptr, sorted_ptr, expert_ids_ptr,
                         num_pairs, inter, up_row, hidden, top_k, stride_xt, stride_xst, stride_we, stride_wf,
                         stride_wse, stride_wsf, stride_hr, stride_hsr, SCALE_N, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, TMA,
                         INTERPRET)
    else:
        pid_m, pid_n = _grouped_pids(num_rows // BLOCK_M, num_pid_n, GROUP_M)
        _fp8_up_tile(pid_m, pid_n, x_ptr, xs_ptr, w_ptr, w_desc, ws_ptr, h_ptr, hs_ptr, sorted_ptr, expert_ids_ptr,
                     num_pairs, inter, up_row, hidden, top_k, stride_xt, stride_xst, stride_we, stride_wf,
                     stride_wse, stride_wsf, stride_hr, stride_hsr, SCALE_N, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, TMA,
                     INTERPRET)


@triton.jit
def _fp8_down_tile(pid_m, pid_n, h_ptr, hs_ptr, w_ptr, h_desc, w_desc, ws_ptr, y_ptr, sorted_ptr, expert_ids_ptr,
                   weights_ptr, num_pairs, hidden, inter, top_k,
                   stride_hr, stride_hsr, stride_we, stride_wd, stride_wse, stride_wsd, stride_yr,
                   SCALE_N: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, ATOMIC: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr):
    expert = tl.load(expert_ids_ptr + pid_m)
    if expert >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair_m = tl.load(sorted_ptr + offs_m)
        row_ok = pair_m < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        offs_k = tl.arange(0, BLOCK_K)
        e64 = expert.to(tl.int64)
        rows = offs_m.to(tl.int64)
        # Padding rows of a block were written by the up kernel too (zeros), so A needs no row mask.
        a_ptrs = h_ptr + rows[:, None] * stride_hr + offs_k[None, :]
        as_ptrs = hs_ptr + rows * stride_hsr
        b_ptrs = w_ptr + e64 * stride_we + offs_n[None, :].to(tl.int64) * stride_wd + offs_k[:, None]
        bs_ptrs = ws_ptr + e64 * stride_wse + (offs_n // SCALE_N) * stride_wsd
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            if TMA:  # hq's sorted rows are contiguous: A is a TMA box too
                a = h_desc.load([pid_m * BLOCK_M, k0])
                b = tl.trans(tl.reshape(w_desc.load([expert, pid_n * BLOCK_N, k0]), [BLOCK_N, BLOCK_K]))
            else:
                k_ok = offs_k < inter - k0
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            a_s = tl.load(as_ptrs + k0 // GROUP)
            b_s = tl.load(bs_ptrs + k0 // GROUP, mask=n_ok, other=0.0)
            acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        w_m = tl.load(weights_ptr + pair_m, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w_m[:, None]
        mask = row_ok[:, None] & n_ok[None, :]
        if ATOMIC:
            tok_m = (pair_m // top_k).to(tl.int64)
            tl.atomic_add(y_ptr + tok_m[:, None] * stride_yr + offs_n[None, :], acc, mask=mask, sem="relaxed")
        else:
            y_ptrs = y_ptr + pair_m[:, None].to(tl.int64) * stride_yr + offs_n[None, :]
            tl.store(y_ptrs, common.cast(acc, y_ptr.dtype.element_ty, INTERPRET), mask=mask)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_fp8_down_kernel(h_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, sorted_ptr, expert_ids_ptr, num_rows_ptr, weights_ptr,
                         num_pairs, num_rows, num_experts, hidden, inter, top_k,
                         stride_hr, stride_hsr, stride_we, stride_wd, stride_wse, stride_wsd, stride_yr,
                         SCALE_N: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         ATOMIC: tl.constexpr, PERSISTENT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr):
    if TMA:
        h_desc = tl.make_tensor_descriptor(h_ptr, shape=[num_rows, inter], strides=[stride_hr, 1],
                                           block_shape=[BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[num_experts, hidden, inter], strides=[stride_we, stride_wd, 1],
                                           block_shape=[1, BLOCK_N, BLOCK_K])
    else:
        h_desc, w_desc = h_ptr, w_ptr  # (unused)
    num_pid_n = tl.cdiv(hidden, BLOCK_N)
    if PERSISTENT:
        live_m = tl.load(num_rows_ptr) // BLOCK_M
        for tile in range(tl.program_id(0), live_m * num_pid_n, tl.num_programs(0)):
            pid_m, pid_n = _tile_pids(tile, live_m, num_pid_n, GROUP_M)
            _fp8_down_tile(pid_m, pid_n, h_ptr, hs_ptr, w_ptr, h_desc, w_desc, ws_ptr, y_ptr, sorted_ptr,
                           expert_ids_ptr, weights_ptr, num_pairs, hidden, inter, top_k, stride_hr, stride_hsr,
                           stride_we, stride_wd, stride_wse, stride_wsd, stride_yr, SCALE_N, GROUP, BLOCK_M, BLOCK_N,
                           BLOCK_K, ATOMIC, TMA, INTERPRET)
    else:
        pid_m, pid_n = _grouped_pids(num_rows // BLOCK_M, num_pid_n, GROUP_M)
        _fp8_down_tile(pid_m, pid_n, h_ptr, hs_ptr, w_ptr, h_desc, w_desc, ws_ptr, y_ptr, sorted_ptr,
                       expert_ids_ptr, weights_ptr, num_pairs, hidden, inter, top_k, stride_hr, stride_hsr,
                       stride_we, stride_wd, stride_wse, stride_wsd, stride_yr, SCALE_N, GROUP, BLOCK_M, BLOCK_N,
                       BLOCK_K, ATOMIC, TMA, INTERPRET)


# -- launch configs ------------------------------------------------------------------------------------------------------
def fp8_config_file_name(num_experts: int, inter: int, name: str) -> str:
    """Tuned FP8 files: a prefix of their own, so the bf16 tools' `E=*,N=*,device_name=*.json` globs skip them."""
    return f"fp8_w8a8,E={num_experts},N={inter},device_name={name}.json"


def get_fp8_moe_config(num_experts: int, inter: int, num_tokens: int, top_k: int, device: torch.device,
                       config_dir: str | Path | None = None) -> MoELaunchConfig:
    """As moe_config.get_moe_config, from the FP8 files: a tuned `fp8_w8a8,E=..,N=..,device_name=..json`, else
    `fp8_moe_default.json` (rows per expert); `fp8_moe_interpreter.json` on CPU."""
    key, buckets = fp8_config_table(num_experts, inter, moe_config.device_name(device), config_dir)
    return _pick(key, buckets, num_tokens, top_k, num_experts)


def fp8_config_table(num_experts: int, inter: int, name: str, config_dir: str | Path | None = None):
    """(key kind, sorted buckets) of the FP8 file a shape's launch configs come from on GPU `name` ('cpu': the
    interpreter's); `get_fp8_moe_config` picks from it."""
    root = Path(config_dir) if config_dir is not None else CONFIG_DIR
    if name == "cpu":
        return load_config_file(str(CONFIG_DIR / "fp8_moe_interpreter.json"))
    found = load_config_file(str(root / fp8_config_file_name(num_experts, inter, name)))
    return found or load_config_file(str(CONFIG_DIR / "fp8_moe_default.json"))


def _blocks(cfg: MoELaunchConfig, bk: int) -> tuple[int, int, int, int]:
    """(up BN, up BK, down BN, down BK) for weight blocks of Bk input channels: BK capped at Bk (a K step stays
    in one scale group; both powers of two, so Bk is a multiple), the up BN raised to a multiple of Bk (the
    epilogue quantizes whole groups of h)."""
    return (max(cfg.up.BLOCK_SIZE_N, bk), min(cfg.up.BLOCK_SIZE_K, bk), cfg.down.BLOCK_SIZE_N,
            min(cfg.down.BLOCK_SIZE_K, bk))


def _check(x_TD, w13q_EFD, w13_scale_inv, w2q_EDI, w2_scale_inv, topk_weights_TK, topk_ids_TK, block) -> None:
    common.check_dtype("x_TD", x_TD)
    check_fp8_weight("w13q_EFD", w13q_EFD, w13_scale_inv, block)
    check_fp8_weight("w2q_EDI", w2q_EDI, w2_scale_inv, block)
    E, F, D = w13q_EFD.shape
    if x_TD.shape[1] != D or w2q_EDI.dim() != 3 or tuple(w2q_EDI.shape[:2]) != (E, D) or F < 2 * w2q_EDI.shape[2]:
        raise ValueError(f"shapes x_TD={tuple(x_TD.shape)}, w13q_EFD={tuple(w13q_EFD.shape)}, "
                         f"w2q_EDI={tuple(w2q_EDI.shape)} do not fit: need w13q [E, U + I, D] (U >= I) and "
                         "w2q [E, D, I].")
    if topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"topk_ids_TK {tuple(topk_ids_TK.shape)} and topk_weights_TK {tuple(topk_weights_TK.shape)} "
                         f"must both be [T, K] with T={x_TD.shape[0]}.")


def triton_fused_moe_fp8(
    x_TD: torch.Tensor,
    w13q_EFD: torch.Tensor,
    w13_scale_inv: torch.Tensor,
    w2q_EDI: torch.Tensor,
    w2_scale_inv: torch.Tensor,
    topk_weights_TK: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    expert_map_G: torch.Tensor | None = None,
    block: tuple[int, int] = DEFAULT_BLOCK,
    *,
    out: torch.Tensor | None = None,
    config: MoELaunchConfig | None = None,
    combine: str = "sum",
) -> torch.Tensor:
    """Same contract as fp8.reference_fused_moe_fp8: x [T, D] (float32/bfloat16/float16), FP8 expert weights with
    their block scales; [T, D] in x's dtype, rows whose experts are all remote are 0.

    `out`, `config` and `combine` ("sum" | "atomic") as in triton_moe.triton_fused_moe; `config` gives the
    bf16-style blocks and is adapted to the weight block (`_blocks`). No device→host sync."""
    bn, bk = check_triton_block(block)
    _check(x_TD, w13q_EFD, w13_scale_inv, w2q_EDI, w2_scale_inv, topk_weights_TK, topk_ids_TK, (bn, bk))
    if combine not in ("sum", "atomic"):
        raise ValueError(f"combine={combine!r} is invalid: must be 'sum' or 'atomic'.")
    T, D = x_TD.shape
    E = w13q_EFD.shape[0]
    I, K = w2q_EDI.shape[2], topk_ids_TK.shape[1]
    U = up_row(w13q_EFD, w2q_EDI)
    dev, dt = x_TD.device, x_TD.dtype
    if out is None:
        out = common.workspace((T, D), dt, dev)
    elif out.shape != x_TD.shape or out.dtype != dt or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be [T, D] = {tuple(x_TD.shape)}, {dt}, rows contiguous.")
    if T == 0:
        return out
    w13q_EFD, w13_scale_inv, w2q_EDI, w2_scale_inv = (
        t if t.is_contiguous() else t.contiguous() for t in (w13q_EFD, w13_scale_inv, w2q_EDI, w2_scale_inv))
    weights_P = topk_weights_TK.reshape(-1).contiguous()
    ids_P = topk_ids_TK.reshape(-1).contiguous()
    cfg = config or get_fp8_moe_config(E, I, T, K, dev)
    BM = cfg.BLOCK_SIZE_M
    up_bn, up_bk, down_bn, down_bk = _blocks(cfg, bk)
    xq_TD, xs_TG = triton_per_token_group_quant(x_TD, bk)
    sorted_R, expert_ids_B, rows_1 = moe_align_block_size(ids_P, BM, E, expert_map_G)
    R, P = sorted_R.numel(), ids_P.numel()
    interp = common.interpreting(x_TD)

    hq_RI = common.workspace((R, I), xq_TD.dtype, dev)
    hs_RG = common.workspace((R, triton.cdiv(I, bk)), torch.float32, dev)
    up, down = cfg.up, cfg.down
    _moe_fp8_up_kernel[(gemm_grid(R // BM * triton.cdiv(I, up_bn), up.PERSISTENT, dev),)](
        xq_TD, xs_TG, w13q_EFD, w13_scale_inv, hq_RI, hs_RG, sorted_R, expert_ids_B, rows_1, P, R, E, I, U, D, K,
        xq_TD.stride(0), xs_TG.stride(0), w13q_EFD.stride(0), w13q_EFD.stride(1), w13_scale_inv.stride(0),
        w13_scale_inv.stride(1), hq_RI.stride(0), hs_RG.stride(0),
        SCALE_N=bn, GROUP=bk, BLOCK_M=BM, BLOCK_N=up_bn, BLOCK_K=up_bk, GROUP_M=cfg.up.GROUP_SIZE_M,
        PERSISTENT=up.PERSISTENT > 0, TMA=up.TMA and tma_ok(w13q_EFD) and U * w13q_EFD.stride(1) % 16 == 0,
        INTERPRET=interp, num_warps=cfg.up.num_warps, num_stages=cfg.up.num_stages)

    atomic = combine == "atomic"
    if atomic:
        y = out if (dt == torch.float32 and out.is_contiguous()) else common.workspace((T, D), torch.float32, dev)
        y.zero_()
    else:
        y = common.workspace((P, D), dt, dev)
    _moe_fp8_down_kernel[(gemm_grid(R // BM * triton.cdiv(D, down_bn), down.PERSISTENT, dev),)](
        hq_RI, hs_RG, w2q_EDI, w2_scale_inv, y, sorted_R, expert_ids_B, rows_1, weights_P, P, R, E, D, I, K,
        hq_RI.stride(0), hs_RG.stride(0), w2q_EDI.stride(0), w2q_EDI.stride(1), w2_scale_inv.stride(0),
        w2_scale_inv.stride(1), y.stride(0),
        SCALE_N=bn, GROUP=bk, BLOCK_M=BM, BLOCK_N=down_bn, BLOCK_K=down_bk, GROUP_M=cfg.down.GROUP_SIZE_M,
        ATOMIC=atomic, PERSISTENT=down.PERSISTENT > 0, TMA=down.TMA and tma_ok(w2q_EDI, hq_RI), INTERPRET=interp,
        num_warps=cfg.down.num_warps, num_stages=cfg.down.num_stages)
    if atomic:
        if y is not out:
            out.copy_(y)
        return out
    has_map = expert_map_G is not None
    BLOCK_D = min(1024, triton.next_power_of_2(D))
    _moe_sum_kernel[(T, triton.cdiv(D, BLOCK_D))](
        y, ids_P, expert_map_G if has_map else ids_P, out, P, expert_map_G.numel() if has_map else E, D, K,
        y.stride(0), out.stride(0), BLOCK_D=BLOCK_D, HAS_MAP=has_map, INTERPRET=interp, num_warps=4)
    return out
