"""The K loops of the packed weight formats (INT4, MXFP4, NVFP4: 4-bit values packed along the reduction dim, with
scales per group), written once: the UP_LOOP and DOWN_LOOP these formats hand the GEMM scaffold
(kernels/triton_moe_gemm.py). Legend as triton_moe.py's.

A packed format's weight of one GEMM is, per expert, q [N, K/QDIV] (int32 words, QDIV = 8, or bytes, QDIV = 2;
contiguous along K), scales s [N, S] (+ INT4's zero points z, shaped and strided as s; + NVFP4's per-expert global
scales g). A K step reads the [BLOCK_N, BLOCK_K/QDIV] q tile of the expert's rows n..n+BN and what the format needs
of s (and z), gets the fp32 accumulator's update from the format, and steps the pointers along K; gate-up runs two
accumulators (gate rows n.., up rows I+n..) as every format does.

What a format plugs in, FMT = (TILE, DOT, QDIV, SG, HAS_G, *own) (a constexpr tuple; `own` are its switches, read by
its TILE and DOT as FMT[5], FMT[6]):
- `TILE(q_ptrs, s, z_ptrs, k0, k_left, n_ok, BLOCK_N, BLOCK_K, EVEN_K, FMT) -> w`: the K step's weight operand,
  loaded (columns past the reduction dim, `k_left` of which remain from k0, and rows past N read as zeros) and,
  where the format decodes before the dot, decoded (INT4: an fp32 [BN, BK] tile; MXFP4 / NVFP4: (q, s)); `s` is
  the s pointers when SG is 0, else the step's scale tile, which the loops load (`scales_at`).
- `DOT(a, w, acc, BLOCK_N, BLOCK_K, FMT, INTERPRET, PREC) -> acc + a @ (the weight values)ᵀ`, in fp32.
- QDIV: K values per packed column (the q pointers step BLOCK_K // QDIV columns a K step).
- SG: K values per scale column: the s pointers are a [BN, BLOCK_K/SG] tile stepping BLOCK_K/SG columns (stride_ss)
  a K step; 0: s_ptrs (and z_ptrs) point at each row's first group and the TILE addresses the groups from k0 (INT4).
- HAS_G: the expert's global scales multiply the accumulators after the loop (gate's at g, up's at g + 1; down's at
  g), constant along K as they are.
w_ops = (wq_ptr, ws_ptr, wz_ptr, wg_ptr, stride_qe, stride_qn, stride_se, stride_sn, stride_ss, stride_ge): a format
passes any pointer and stride for those it has not (they are never read). `scaled_tile` is the TILE of the formats
whose scales step along K (MXFP4, NVFP4). The host side they share is `PackedFormat` (the launches), `select_path`
(INT4's and MXFP4's paths), `check_path` and `native_a_format` (MXFP4's and NVFP4's tl.dot_scaled activations).
"""
from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import triton
import triton.language as tl

from .moe_config import GemmConfig, MoELaunchConfig
from .triton_moe_gemm import WeightFormat, load_rows, load_weights


@triton.jit
def _packed_ptrs(w_ops, expert, offs_n, BLOCK_K: tl.constexpr, FMT: tl.constexpr):
    """(q, s, z) pointer tiles of the expert's rows offs_n at K = 0."""
    wq_ptr, ws_ptr, wz_ptr, wg_ptr, stride_qe, stride_qn, stride_se, stride_sn, stride_ss, stride_ge = w_ops
    QDIV: tl.constexpr = FMT[2]
    SG: tl.constexpr = FMT[3]
    rows_n = offs_n.to(tl.int64)
    e64 = expert.to(tl.int64)
    if SG == 32:
        # (MXFP4) a row is whole groups of 16 bytes (32 // QDIV words or bytes): said, the K step's q tile loads,
        # and cp.async copies, in 16-byte pieces, where Triton's divisibility check (by 16 elements) saw gpt-oss's
        # 1440-byte rows (360 words) as unaligned and issued 4-byte copies.
        stride_qn = tl.multiple_of(stride_qn, 32 // QDIV)
    q_ptrs = wq_ptr + e64 * stride_qe + rows_n[:, None] * stride_qn + tl.arange(0, BLOCK_K // QDIV)[None, :]
    s_ptrs = ws_ptr + e64 * stride_se + rows_n[:, None] * stride_sn
    if SG:
        s_ptrs += tl.arange(0, BLOCK_K // SG)[None, :] * stride_ss
    z_ptrs = wz_ptr + e64 * stride_se + rows_n[:, None] * stride_sn
    return q_ptrs, s_ptrs, z_ptrs


@triton.jit
def gate_up_ptrs(w_ops, expert, offs_n, inter, BLOCK_K: tl.constexpr, FMT: tl.constexpr):
    """(q, s, z) pointer tiles of the expert's gate rows offs_n, then of its up rows I + offs_n, at K = 0 (w_ops and
    FMT[2:4] as the K loops take them: the INT4 gate-up GEMV of kernels/triton_moe_int4_tiny.py starts from them
    too)."""
    stride_qn, stride_sn = w_ops[5], w_ops[7]
    gq_ptrs, gs_ptrs, gz_ptrs = _packed_ptrs(w_ops, expert, offs_n, BLOCK_K, FMT)
    return (gq_ptrs, gs_ptrs, gz_ptrs, gq_ptrs + inter * stride_qn, gs_ptrs + inter * stride_sn,
            gz_ptrs + inter * stride_sn)


@triton.jit
def scales_at(s_ptrs, k_left, n_ok, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, FMT: tl.constexpr):
    """The [BN, BK/SG] scale tile of the K step with `k_left` values left (none: all masked, zeros)."""
    SG: tl.constexpr = FMT[3]
    return load_weights(s_ptrs, n_ok, tl.arange(0, BLOCK_K // SG) < k_left // SG, EVEN_K, True)


@triton.jit
def scaled_tile(q_ptrs, s, z_ptrs, k0, k_left, n_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                EVEN_K: tl.constexpr, FMT: tl.constexpr):
    """TILE of the formats whose scale tiles step along K: (q [BN, BK/QDIV] as stored, s), s the step's [BN, BK/SG]
    scale tile, which the loops load (`scales_at`; MXFP4's one step ahead; the reduction dim is a multiple of SG:
    whole packed columns and groups)."""
    QDIV: tl.constexpr = FMT[2]
    q = load_weights(q_ptrs, n_ok, tl.arange(0, BLOCK_K // QDIV) < k_left // QDIV, EVEN_K, True)
    return q, s


@triton.jit
def packed_up_loop(a_ptrs, x_ops, w_ops, expert, tok_m, row_ok, offs_n, n_ok, pid_n, inter, hidden,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                   TMA: tl.constexpr, FMT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """UP_LOOP of a packed format (module docstring): gate rows n.. and up rows I+n.. of w13, two accumulators."""
    TILE: tl.constexpr = FMT[0]
    DOT: tl.constexpr = FMT[1]
    QDIV: tl.constexpr = FMT[2]
    SG: tl.constexpr = FMT[3]
    HAS_G: tl.constexpr = FMT[4]
    stride_ss = w_ops[8]
    offs_k = tl.arange(0, BLOCK_K)
    gq_ptrs, gs_ptrs, gz_ptrs, uq_ptrs, us_ptrs, uz_ptrs = gate_up_ptrs(w_ops, expert, offs_n, inter, BLOCK_K, FMT)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # MXFP4 (SG 32) loads the next step's scale tiles before this step's decode: a scale tile is a byte or two a
    # thread, too small for cp.async, so Triton's pipeliner leaves it a plain load, and loaded in its own step
    # every step waited one memory round trip for it (sm_90 SASS: LDG.E.U8 read 40-70 instructions later, before
    # a barrier). NVFP4 keeps in-step loads: its 32x64x128 gate-up, at 255 registers, spills 52 bytes with them
    # carried (compile report).
    AHEAD: tl.constexpr = SG == 32
    if AHEAD:
        gs_next = scales_at(gs_ptrs, hidden, n_ok, BLOCK_K, EVEN_K, FMT)
        us_next = scales_at(us_ptrs, hidden, n_ok, BLOCK_K, EVEN_K, FMT)
    for k0 in range(0, hidden, BLOCK_K):
        a = load_rows(a_ptrs, row_ok, offs_k, hidden - k0, EVEN_K)
        if AHEAD:
            gs, us = gs_next, us_next
            gs_ptrs += (BLOCK_K // SG) * stride_ss
            us_ptrs += (BLOCK_K // SG) * stride_ss
            gs_next = scales_at(gs_ptrs, hidden - k0 - BLOCK_K, n_ok, BLOCK_K, False, FMT)
            us_next = scales_at(us_ptrs, hidden - k0 - BLOCK_K, n_ok, BLOCK_K, False, FMT)
        elif SG:
            gs = scales_at(gs_ptrs, hidden - k0, n_ok, BLOCK_K, EVEN_K, FMT)
            us = scales_at(us_ptrs, hidden - k0, n_ok, BLOCK_K, EVEN_K, FMT)
            gs_ptrs += (BLOCK_K // SG) * stride_ss
            us_ptrs += (BLOCK_K // SG) * stride_ss
        else:
            gs, us = gs_ptrs, us_ptrs  # (INT4: its TILE addresses its groups from k0)
        wg = TILE(gq_ptrs, gs, gz_ptrs, k0, hidden - k0, n_ok, BLOCK_N, BLOCK_K, EVEN_K, FMT)
        wu = TILE(uq_ptrs, us, uz_ptrs, k0, hidden - k0, n_ok, BLOCK_N, BLOCK_K, EVEN_K, FMT)
        acc_g = DOT(a, wg, acc_g, BLOCK_N, BLOCK_K, FMT, INTERPRET, PREC)
        acc_u = DOT(a, wu, acc_u, BLOCK_N, BLOCK_K, FMT, INTERPRET, PREC)
        a_ptrs += BLOCK_K
        gq_ptrs += BLOCK_K // QDIV
        uq_ptrs += BLOCK_K // QDIV
    if HAS_G:
        g_ptr = w_ops[3] + expert.to(tl.int64) * w_ops[9]
        acc_g = acc_g * tl.load(g_ptr)
        acc_u = acc_u * tl.load(g_ptr + 1)
    return acc_g, acc_u


@triton.jit
def packed_down_loop(h_ops, w_ops, expert, offs_m, pid_m, offs_n, n_ok, pid_n, inter,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                     TMA: tl.constexpr, FMT: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """DOWN_LOOP of a packed format (module docstring). h_ops = (h_ptr, stride_hr): h in the activation dtype."""
    h_ptr, stride_hr = h_ops
    TILE: tl.constexpr = FMT[0]
    DOT: tl.constexpr = FMT[1]
    QDIV: tl.constexpr = FMT[2]
    SG: tl.constexpr = FMT[3]
    HAS_G: tl.constexpr = FMT[4]
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hr + offs_k[None, :]
    q_ptrs, s_ptrs, z_ptrs = _packed_ptrs(w_ops, expert, offs_n, BLOCK_K, FMT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    AHEAD: tl.constexpr = SG == 32  # (as the gate-up loop)
    if AHEAD:
        s_next = scales_at(s_ptrs, inter, n_ok, BLOCK_K, EVEN_K, FMT)
    for k0 in range(0, inter, BLOCK_K):
        a = tl.load(a_ptrs) if EVEN_K else tl.load(a_ptrs, mask=(offs_k < inter - k0)[None, :], other=0.0)
        if AHEAD:
            s = s_next
            s_ptrs += (BLOCK_K // SG) * w_ops[8]
            s_next = scales_at(s_ptrs, inter - k0 - BLOCK_K, n_ok, BLOCK_K, False, FMT)
        elif SG:
            s = scales_at(s_ptrs, inter - k0, n_ok, BLOCK_K, EVEN_K, FMT)
            s_ptrs += (BLOCK_K // SG) * w_ops[8]
        else:
            s = s_ptrs
        w = TILE(q_ptrs, s, z_ptrs, k0, inter - k0, n_ok, BLOCK_N, BLOCK_K, EVEN_K, FMT)
        acc = DOT(a, w, acc, BLOCK_N, BLOCK_K, FMT, INTERPRET, PREC)
        a_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // QDIV
    if HAS_G:
        acc = acc * tl.load(w_ops[3] + expert.to(tl.int64) * w_ops[9])
    return acc


@dataclass(frozen=True)
class PackedFormat(WeightFormat):
    """The host side the packed formats share: each GEMM one program per tile with pointer loads (the config's
    PERSISTENT and TMA keys are not applied), A is x and h is [R, I] in x's dtype (WeightFormat's defaults). A
    subclass names its two kernels (KERNELS: gate-up's, down's; their x/h operands are x_ptr, stride_xt, h_ptr,
    stride_hr), fits the launch config to its weights (`fit`) and gives a GEMM's weight operands and constexprs
    (`weight`)."""

    KERNELS: ClassVar[tuple[triton.JITFunction, triton.JITFunction]]

    @abstractmethod
    def fit(self, cfg: MoELaunchConfig) -> MoELaunchConfig:
        """The launch config as this format runs it (its block sizes)."""

    @abstractmethod
    def weight(self, up: bool) -> dict:
        """The gate-up (`up`) or down GEMM's weight tensors, strides and constexprs, by kernel parameter name."""

    def gemms(self, cfg: MoELaunchConfig) -> tuple[GemmConfig, GemmConfig]:
        """`fit`'s, one program per tile and pointer loads."""
        cfg = self.fit(cfg)
        return replace(cfg.up, PERSISTENT=0, TMA=False), replace(cfg.down, PERSISTENT=0, TMA=False)

    def up_launch(self, g: GemmConfig, a: tuple, h: tuple) -> tuple[triton.JITFunction, dict]:
        (x_TD,), (h_RI,) = a, h
        return self.KERNELS[0], dict(x_ptr=x_TD, h_ptr=h_RI, stride_xt=x_TD.stride(0), stride_hr=h_RI.stride(0),
                                     TMA=False, **self.weight(True))

    def down_launch(self, g: GemmConfig, h: tuple) -> tuple[triton.JITFunction, dict]:
        (h_RI,) = h
        return self.KERNELS[1], dict(h_ptr=h_RI, stride_hr=h_RI.stride(0), TMA=False, **self.weight(False))


# The paths of the formats with decode GEMVs and a path that dequantizes every expert first (INT4, MXFP4).
PATHS = ("auto", "tiny", "sorted", "dequant")
# tl.dot_scaled's names of the activation dtypes it takes (MXFP4's and NVFP4's native path).
NATIVE_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def check_path(path: str) -> None:
    if path not in PATHS:
        raise ValueError(f"path={path!r} is invalid: must be one of {', '.join(PATHS)}.")


def select_path(cfg: MoELaunchConfig, num_tokens: int, top_k: int, path: str = "auto") -> str:
    """Which path (PATHS) a batch of an INT4 or MXFP4 MoE takes under `cfg`, the bucket its token count picked (the
    one selector; kernels/moe_variants.py composes it): "tiny" when T*K <= TINY.max_pairs, else "dequant" where the
    bucket says DEQUANT, else "sorted" (per-tile dequantization). A function of the token count alone (graph-safe);
    `path` other than "auto" forces one."""
    if path != "auto":
        return path
    if cfg.uses_tiny(num_tokens * top_k):
        return "tiny"
    return "dequant" if cfg.dequant else "sorted"


def native_a_format(dtype: torch.dtype, native: bool) -> str:
    """The A_FORMAT constexpr of MXFP4's and NVFP4's kernels for activations of `dtype`: tl.dot_scaled's name of it
    (bf16 or fp16 only, with `native`; unread without)."""
    if native and dtype not in NATIVE_DTYPES:
        raise ValueError(f"native=True is invalid with x_TD.dtype={dtype}: tl.dot_scaled takes bf16 or fp16 "
                         "activations.")
    return NATIVE_DTYPES.get(dtype, "bf16")
