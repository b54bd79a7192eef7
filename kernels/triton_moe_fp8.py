"""Fused MoE experts with FP8 block-scaled weights and W8A8 activations, in Triton.

Legend: T tokens, D hidden, E local experts, G global experts, I expert intermediate size, F = U + I rows of
gate [0, I) and up [U, U + I) (U = I stacked, or I rounded up to Bn: fp8.reference_fused_moe_fp8), K top-k,
P = T*K pairs, R padded rows (moe_align), Gd = ceil(D / Bk), Gi = ceil(I / Bk) activation groups per row,
Bn x Bk the weight block (128 x 128 published). Same contract as fp8.reference_fused_moe_fp8.

A weight format of the fused-MoE pipeline (kernels/triton_moe.py; the GEMM scaffold of kernels/triton_moe_gemm.py
runs the K loops and the epilogue store below). Data flow (the bf16 fused MoE's, with scales):
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

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import moe_config
from . import triton_common as common
from .fp8 import DEFAULT_BLOCK, FP8_DTYPE, up_row
from .moe_config import ConfigTable, GemmConfig, MoELaunchConfig, _pick, format_config_table
from .moe_schedule import tma_ok
from .triton_fp8 import check_fp8_weight, check_triton_block, quant_tile, triton_per_token_group_quant
from .moe import SILU, MoEActivation
from .triton_moe import ACT_SILU, activation_args, check_routing, output, sorted_fused_moe
from .triton_moe_gemm import (WeightFormat, down_descs, gate_up_desc, load_weights, sorted_down_gemm, sorted_up_gemm)


@triton.jit
def fp8_up_loop(a_ptrs, x_ops, w_ops, expert, tok_m, row_ok, offs_n, n_ok, pid_n, inter, hidden,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                TMA: tl.constexpr, FMT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """UP_LOOP of FP8 weights, FMT = (SCALE_N, GROUP) = (Bn, Bk). x_ops = (xq_ptr, stride_xt, xs_ptr, stride_xst),
    w_ops = (w_ptr, w_desc, ws_ptr, up_row, stride_we, stride_wf, stride_wse, stride_wsf). The K tail is always
    masked (EVEN_K unused), with one k mask for A and B."""
    xs_ptr, stride_xst = x_ops[2], x_ops[3]
    w_ptr, w_desc, ws_ptr, up_row, stride_we, stride_wf, stride_wse, stride_wsf = w_ops
    SCALE_N: tl.constexpr = FMT[0]
    GROUP: tl.constexpr = FMT[1]
    offs_k = tl.arange(0, BLOCK_K)
    e64 = expert.to(tl.int64)
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
            bg = load_weights(g_ptrs, n_ok, k_ok, False, False)
            bu = load_weights(u_ptrs, n_ok, k_ok, False, False)
        a_s = tl.load(as_ptrs + kg, mask=row_ok, other=0.0)
        g_s = tl.load(gs_ptrs + kg, mask=n_ok, other=0.0)
        u_s = tl.load(us_ptrs + kg, mask=n_ok, other=0.0)
        acc_g += tl.dot(a, bg, out_dtype=tl.float32) * a_s[:, None] * g_s[None, :]
        acc_u += tl.dot(a, bu, out_dtype=tl.float32) * a_s[:, None] * u_s[None, :]
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    return acc_g, acc_u


@triton.jit
def fp8_store_h(h, offs_m, offs_n, n_ok, pid_n, h_ops, inter, BLOCK_N: tl.constexpr, FMT: tl.constexpr,
                INTERPRET: tl.constexpr):
    """STORE_H of FP8: h quantized per row per Bk columns (BLOCK_N is a multiple of Bk: whole groups) into hq and
    hs. h_ops = (hq_ptr, stride_hr, hs_ptr, stride_hsr)."""
    h_ptr, stride_hr, hs_ptr, stride_hsr = h_ops
    GROUP: tl.constexpr = FMT[1]
    # Columns past I hold exact zeros (masked weights, zero scales), so they never raise a group's amax.
    GROUPS: tl.constexpr = BLOCK_N // GROUP
    hq, hs = quant_tile(h, GROUPS, GROUP, INTERPRET)
    rows = offs_m.to(tl.int64)
    tl.store(h_ptr + rows[:, None] * stride_hr + offs_n[None, :], hq, mask=n_ok[None, :])
    offs_g = pid_n * GROUPS + tl.arange(0, GROUPS)
    tl.store(hs_ptr + rows[:, None] * stride_hsr + offs_g[None, :], hs, mask=offs_g[None, :] * GROUP < inter)


@triton.jit
def fp8_down_loop(h_ops, w_ops, expert, offs_m, pid_m, offs_n, n_ok, pid_n, inter,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                  TMA: tl.constexpr, FMT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """DOWN_LOOP of FP8 weights: hq × w2qᵀ with hs and the w2 scales per K step. h_ops = (hq_ptr, stride_hr,
    hs_ptr, stride_hsr, h_desc), w_ops = (w_ptr, w_desc, ws_ptr, stride_we, stride_wd, stride_wse, stride_wsd)."""
    h_ptr, stride_hr, hs_ptr, stride_hsr, h_desc = h_ops
    w_ptr, w_desc, ws_ptr, stride_we, stride_wd, stride_wse, stride_wsd = w_ops
    SCALE_N: tl.constexpr = FMT[0]
    GROUP: tl.constexpr = FMT[1]
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
            b = load_weights(b_ptrs, n_ok, k_ok, False, False)
        a_s = tl.load(as_ptrs + k0 // GROUP)
        b_s = tl.load(bs_ptrs + k0 // GROUP, mask=n_ok, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    return acc


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_fp8_up_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, hs_ptr, sorted_ptr, expert_ids_ptr, num_rows_ptr,
                       num_pairs, num_rows, num_experts, inter, up_row, hidden, top_k,
                       stride_xt, stride_xst, stride_we, stride_wf, stride_wse, stride_wsf, stride_hr, stride_hsr,
                       b13_ptr, stride_be, alpha, limit,
                       SCALE_N: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                       EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PERSISTENT: tl.constexpr,
                       TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    # (b13_ptr .. limit, HAS_BIAS, ACT: the pipeline's epilogue arguments, after the FP8 kernel's own so those keep
    # their order, see WeightFormat; FP8 experts take no bias and run SiLU)
    w_desc = gate_up_desc(w_ptr, num_experts, inter, up_row, hidden, stride_we, stride_wf, BLOCK_N, BLOCK_K, 1, TMA)
    sorted_up_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, inter, hidden), num_rows_ptr, num_rows,
                   (b13_ptr, stride_be, alpha, limit), (x_ptr, stride_xt, xs_ptr, stride_xst),
                   (w_ptr, w_desc, ws_ptr, up_row, stride_we, stride_wf, stride_wse, stride_wsf),
                   (h_ptr, stride_hr, hs_ptr, stride_hsr), fp8_up_loop, fp8_store_h, (SCALE_N, GROUP), BLOCK_M,
                   BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, HAS_BIAS, ACT, PERSISTENT, TMA, INTERPRET, PREC)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_fp8_down_kernel(h_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, sorted_ptr, expert_ids_ptr, num_rows_ptr, weights_ptr,
                         num_pairs, num_rows, num_experts, hidden, inter, top_k,
                         stride_hr, stride_hsr, stride_we, stride_wd, stride_wse, stride_wsd, stride_yr, b2_ptr,
                         stride_be, SCALE_N: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr, PERSISTENT: tl.constexpr,
                         TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    h_desc, w_desc = down_descs(h_ptr, w_ptr, num_rows, num_experts, hidden, inter, stride_hr, stride_we, stride_wd,
                                BLOCK_M, BLOCK_N, BLOCK_K, TMA)
    sorted_down_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, hidden, inter), num_rows_ptr, num_rows,
                     (b2_ptr, stride_be, weights_ptr, y_ptr, stride_yr), (h_ptr, stride_hr, hs_ptr, stride_hsr, h_desc),
                     (w_ptr, w_desc, ws_ptr, stride_we, stride_wd, stride_wse, stride_wsd), fp8_down_loop,
                     (SCALE_N, GROUP), BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, ATOMIC, HAS_BIAS, PERSISTENT, TMA,
                     INTERPRET, PREC)


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


def fp8_config_table(num_experts: int, inter: int, name: str,
                     config_dir: str | Path | None = None) -> ConfigTable:
    """(key kind, sorted buckets) of the FP8 file a shape's launch configs come from on GPU `name` ('cpu': the
    interpreter's); `get_fp8_moe_config` picks from it."""
    return format_config_table("fp8", fp8_config_file_name(num_experts, inter, name), name, config_dir)


def _blocks(cfg: MoELaunchConfig, bk: int) -> tuple[int, int, int, int]:
    """(up BN, up BK, down BN, down BK) for weight blocks of Bk input channels: BK capped at Bk (a K step stays
    in one scale group; both powers of two, so Bk is a multiple), the up BN raised to a multiple of Bk (the
    epilogue quantizes whole groups of h)."""
    return (max(cfg.up.BLOCK_SIZE_N, bk), min(cfg.up.BLOCK_SIZE_K, bk), cfg.down.BLOCK_SIZE_N,
            min(cfg.down.BLOCK_SIZE_K, bk))


def fp8_launch_config(cfg: MoELaunchConfig, bk: int = DEFAULT_BLOCK[1]) -> MoELaunchConfig:
    """`cfg` as this wrapper launches it for weight blocks of Bk input channels: `_blocks`' BLOCK_N / BLOCK_K, no
    fused gate-up tile, no warp specialization (the FP8 kernels have neither); its TINY entry as it is (the FP8 tiny
    GEMVs, kernels/triton_moe_fp8_tiny.py, narrow their own rows). Configs that map to the same one launch the same
    kernels: benchmarks/tune_moe_fp8.py times them once and writes this form."""
    up_bn, up_bk, down_bn, down_bk = _blocks(cfg, bk)
    plain = dict(FUSED_GATE_UP=False, WARP_SPECIALIZE=False)
    return MoELaunchConfig(cfg.BLOCK_SIZE_M, replace(cfg.up, BLOCK_SIZE_N=up_bn, BLOCK_SIZE_K=up_bk, **plain),
                           replace(cfg.down, BLOCK_SIZE_N=down_bn, BLOCK_SIZE_K=down_bk, **plain), cfg.tiny)


@dataclass(frozen=True)
class Fp8Format(WeightFormat):
    """FP8 block-scaled experts (checked): w13q [E, U + I, D] and w2q [E, D, I] with their scales, Bn x Bk blocks;
    activations quantized per token per Bk channels, h quantized by the gate-up epilogue."""

    w13q_EFD: torch.Tensor
    w13_scale_inv: torch.Tensor
    w2q_EDI: torch.Tensor
    w2_scale_inv: torch.Tensor
    block: tuple[int, int]
    x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None  # x quantized by the norm before (xq, xs), else None

    def gemms(self, cfg: MoELaunchConfig) -> tuple[GemmConfig, GemmConfig]:
        """The config's, BLOCK_N / BLOCK_K fitted to the weight block (`_blocks`)."""
        up_bn, up_bk, down_bn, down_bk = _blocks(cfg, self.block[1])
        return (replace(cfg.up, BLOCK_SIZE_N=up_bn, BLOCK_SIZE_K=up_bk),
                replace(cfg.down, BLOCK_SIZE_N=down_bn, BLOCK_SIZE_K=down_bk))

    def activations(self, x_TD: torch.Tensor) -> tuple:
        """x quantized once per token: xq [T, D] fp8 and xs [T, Gd] (the norm's, where it wrote them)."""
        return self.x_fp8 if self.x_fp8 is not None else triton_per_token_group_quant(x_TD, self.block[1])

    def hidden(self, rows: int, x_TD: torch.Tensor) -> tuple:
        """hq_RI fp8 and its scales hs_RGi."""
        return (common.workspace((rows, self.inter), FP8_DTYPE, x_TD.device),
                common.workspace((rows, triton.cdiv(self.inter, self.block[1])), torch.float32, x_TD.device))

    def _constexprs(self, tma: bool) -> dict:
        # EVEN_K False: the FP8 loops mask the K tail always, so one compiled kernel serves either remainder.
        return dict(TMA=tma, SCALE_N=self.block[0], GROUP=self.block[1], EVEN_K=False)

    def up_launch(self, g: GemmConfig, a: tuple, h: tuple) -> tuple[triton.JITFunction, dict]:
        (xq_TD, xs_TG), (hq_RI, hs_RG), w, ws = a, h, self.w13q_EFD, self.w13_scale_inv
        U = up_row(w, self.w2q_EDI)
        return _moe_fp8_up_kernel, dict(
            x_ptr=xq_TD, xs_ptr=xs_TG, w_ptr=w, ws_ptr=ws, h_ptr=hq_RI, hs_ptr=hs_RG, up_row=U,
            stride_xt=xq_TD.stride(0), stride_xst=xs_TG.stride(0), stride_we=w.stride(0), stride_wf=w.stride(1),
            stride_wse=ws.stride(0), stride_wsf=ws.stride(1), stride_hr=hq_RI.stride(0), stride_hsr=hs_RG.stride(0),
            **self._constexprs(g.TMA and tma_ok(w) and U * w.stride(1) % 16 == 0))

    def down_launch(self, g: GemmConfig, h: tuple) -> tuple[triton.JITFunction, dict]:
        (hq_RI, hs_RG), w, ws = h, self.w2q_EDI, self.w2_scale_inv
        return _moe_fp8_down_kernel, dict(
            h_ptr=hq_RI, hs_ptr=hs_RG, w_ptr=w, ws_ptr=ws, stride_hr=hq_RI.stride(0), stride_hsr=hs_RG.stride(0),
            stride_we=w.stride(0), stride_wd=w.stride(1), stride_wse=ws.stride(0), stride_wsd=ws.stride(1),
            **self._constexprs(g.TMA and tma_ok(w, hq_RI)))


def _check(x_TD, w13q_EFD, w13_scale_inv, w2q_EDI, w2_scale_inv, topk_weights_TK, topk_ids_TK, block) -> None:
    common.check_dtype("x_TD", x_TD)
    check_fp8_weight("w13q_EFD", w13q_EFD, w13_scale_inv, block)
    check_fp8_weight("w2q_EDI", w2q_EDI, w2_scale_inv, block)
    E, F, D = w13q_EFD.shape
    if x_TD.shape[1] != D or w2q_EDI.dim() != 3 or tuple(w2q_EDI.shape[:2]) != (E, D) or F < 2 * w2q_EDI.shape[2]:
        raise ValueError(f"shapes x_TD={tuple(x_TD.shape)}, w13q_EFD={tuple(w13q_EFD.shape)}, "
                         f"w2q_EDI={tuple(w2q_EDI.shape)} do not fit: need w13q [E, U + I, D] (U >= I) and "
                         "w2q [E, D, I].")
    check_routing(x_TD, topk_weights_TK, topk_ids_TK)


def check_x_fp8(x_TD: torch.Tensor, x_fp8: tuple[torch.Tensor, torch.Tensor], group: int) -> None:
    """x_fp8 = (xq [T, D] e4m3, xs [T, ceil(D / group)] fp32), both contiguous, beside x [T, D]."""
    xq, xs = x_fp8
    T, D = x_TD.shape
    if (xq.dtype != FP8_DTYPE or tuple(xq.shape) != (T, D) or xs.dtype != torch.float32
            or tuple(xs.shape) != (T, triton.cdiv(D, group)) or not (xq.is_contiguous() and xs.is_contiguous())):
        raise ValueError(f"x_fp8 ({tuple(xq.shape)} {xq.dtype}, {tuple(xs.shape)} {xs.dtype}) is invalid beside x "
                         f"{(T, D)}: contiguous ([T, D] {FP8_DTYPE}, [T, ceil(D / {group})] float32).")


def triton_fused_moe_fp8(x_TD: torch.Tensor, w13q_EFD: torch.Tensor, w13_scale_inv: torch.Tensor, w2q_EDI: torch.Tensor,
                         w2_scale_inv: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                         expert_map_G: torch.Tensor | None = None, block: tuple[int, int] = DEFAULT_BLOCK, *,
                         out: torch.Tensor | None = None, config: MoELaunchConfig | None = None,
                         combine: str = "sum", activation: MoEActivation | None = None,
                         path: str = "auto", x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None,
                         fuse_h: bool = True) -> torch.Tensor:
    """Same contract as fp8.reference_fused_moe_fp8: x [T, D] (float32/bfloat16/float16), FP8 expert weights with
    their block scales; [T, D] in x's dtype, rows whose experts are all remote are 0.

    `out`, `config` and `combine` ("sum" | "atomic") as in triton_moe.triton_fused_moe; `config` gives the
    bf16-style blocks and is adapted to the weight block (`_blocks`); `activation` the gate-up epilogue's (None:
    SiLU; Hy4's "silu_clamp"); `path` "auto" (the config's TINY.max_pairs decides: no shipped FP8 config has one),
    "tiny" (kernels/triton_moe_fp8_tiny.py's GEMVs, the config's TINY blocks else DEFAULT_TINY_FP8; summed in a
    fixed order whatever `combine` says) or "sorted". `x_fp8`: (xq [T, D] e4m3, xs [T, ceil(D / Bk)]), x as
    fp8.per_token_group_quant gives it, quantized where x was made (the norm before the MoE:
    triton_norm.triton_add_rms_norm_fp8), so no launch here quantizes it. `fuse_h` (the tiny path): h quantized
    inside the gate-up launch (False: by a launch of its own, the form before; for measurements and tests). No
    device→host sync."""
    bn, bk = check_triton_block(block)
    _check(x_TD, w13q_EFD, w13_scale_inv, w2q_EDI, w2_scale_inv, topk_weights_TK, topk_ids_TK, (bn, bk))
    if x_fp8 is not None:
        check_x_fp8(x_TD, x_fp8, bk)
    out = output(x_TD, out, combine)
    T, K = x_TD.shape[0], topk_ids_TK.shape[1]
    if T == 0:
        return out
    E, I = w13q_EFD.shape[0], w2q_EDI.shape[2]
    w13q, s13, w2q, s2 = (t if t.is_contiguous() else t.contiguous()
                          for t in (w13q_EFD, w13_scale_inv, w2q_EDI, w2_scale_inv))
    if path not in ("auto", "tiny", "sorted"):
        raise ValueError(f"path={path!r} is invalid: must be one of auto, tiny, sorted.")
    fmt = Fp8Format(E, I, w13q, s13, w2q, s2, (bn, bk), x_fp8)
    cfg = config or get_fp8_moe_config(E, I, T, K, x_TD.device)
    act = activation_args(activation) if activation is not None else (ACT_SILU, SILU.alpha, SILU.limit)
    if path == "tiny" or (path == "auto" and cfg.uses_tiny(T * K)):
        from .triton_moe_fp8_tiny import DEFAULT_TINY_FP8, tiny_fused_moe_fp8

        return tiny_fused_moe_fp8(x_TD, w13q, s13, w2q, s2, topk_weights_TK.reshape(-1).contiguous(),
                                  topk_ids_TK.reshape(-1).contiguous(), expert_map_G, (bn, bk), up_row(w13q, w2q), act,
                                  out, cfg.tiny or DEFAULT_TINY_FP8, K, x_fp8, fuse_h)
    return sorted_fused_moe(fmt, x_TD, topk_weights_TK.reshape(-1).contiguous(), topk_ids_TK.reshape(-1).contiguous(),
                            expert_map_G, K, cfg, out, combine, act_args=act)
