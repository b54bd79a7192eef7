"""Fused MoE with NVFP4 expert weights (ModelOpt's FP4 DeepSeek-R1 / Qwen3) in Triton: the float fused MoE
(kernels/triton_moe.py) whose B tiles are dequantized in the K loop, as kernels/triton_moe_mxfp4.py does for MXFP4.

Legend: T tokens, D hidden, E local experts, G global experts, I expert intermediate size, F = 2I, K top-k,
P = T*K pairs, R padded rows (moe_align), B = (reduction dim) / 2 packed bytes of a row, S = (reduction dim) / 16
scale groups.

Weights (kernels/nvfp4.py has the layout): w13 [E, F, D/2] uint8 ([gate; up] rows) + scales [E, F, D/16]
float8_e4m3fn + global scales [E, 2] float32 (gate's, up's); w2 [E, D, I/2] + [E, D, I/16] + [E]. A row's bytes
are contiguous along the reduction dim, so a [BLOCK_N, BLOCK_K/2] byte tile and its [BLOCK_N, BLOCK_K/16] scales
are plain strided loads: a quarter of a bf16 tile's bytes plus 1/16 for the scales.

In the K loop (`NATIVE=False`, every GPU): bytes -> two nibbles (low nibble = even element) -> the e2m1 value
built in fp32 bits -> times the e4m3 block scale (its bits read as uint8 and decoded exactly) -> the activation
dtype, exact: e2m1 x e4m3 has at most 6 significant bits and lies in [2**-10, 2688], inside bf16's and fp16's
normal range -> tl.dot with fp32 accumulation, as the float kernel. The per-tensor global scale (weight_scale_2)
is constant along K, so it multiplies the fp32 accumulator once after the loop: gate's and up's each on their
own accumulator, so checkpoints whose gate and up were calibrated apart are computed exactly. Activations stay
in their dtype (W4A16); the checkpoint's input_scale (W4A4) is not used.

`NATIVE=True` (opt-in, `native=True`; bf16/fp16 activations): `tl.dot_scaled(x, None, "bf16", packed,
scales_e4m3, "e2m1")`. Triton 3.6 and 3.9 accept e4m3 scales there and read their group size from the scale's
dtype (16 for float8e4nv, 32 for uint8 E8M0: `semantic.verify_scaled_shape` / `deduce_scale_factor`), so this is
NVFP4's native operand form. With bf16 activations Triton cannot use Blackwell's block-scaled MMA
(`tcgen05.mma kind::mxf4nvf4` needs both operands FP4 with scales, i.e. activations quantized by input_scale:
the W4A4 numerics change not made here); it upcasts the e2m1 operand with its scales and runs the bf16 MMA.
Compiled offline for sm_100 (2026-11-24): Triton 3.9 lowers it to `tcgen05.mma ... kind::f16` at every
default.json bucket; Triton 3.6 (the GPU machines' version) aborts in TritonGPUAccelerateMatmul (an MLIR
assertion building the missing lhs scale in the rhs scale's fp8 type), so `native=True` is refused below Triton
3.9. The dequantizing path compiles with 3.6 for sm_90 (wgmma from BLOCK_M 64, mma.sync below) and sm_100
(tcgen05 kind::f16 from BLOCK_M 64), without spills. Unlike MXFP4's native path this one is not checked in the
interpreter: Triton 3.9's interpreter reads every dot_scaled scale as an E8M0 exponent
(`_dot_scaled_scale_to_f32`), so it would compute wrong numbers there; tests/kernels/test_triton_moe_nvfp4.py
runs it against the reference only on a GPU of compute capability >= 10, hence opt-in.

The rest is the pipeline's and the GEMM scaffold's (kernels/triton_moe_gemm.py), as for MXFP4: this format
plugs its dot (`nvfp4_dot`, on `scaled_tile`'s bytes and scales; the global scales are the loops' HAS_G) into the
packed formats' K loops (kernels/triton_moe_packed.py) and `Nvfp4Format`; one program per tile without TMA.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .moe import SILU, MoEActivation
from .moe_config import MoELaunchConfig, get_moe_config
from .nvfp4 import GROUP, _check_globals, check_nvfp4
from .triton_common import dot
from .triton_moe import check_routing, routed
from .triton_moe_gemm import sorted_down_gemm, sorted_up_gemm, store_h
from .triton_moe_packed import PackedFormat, native_a_format, packed_down_loop, packed_up_loop, scaled_tile

SCALE_GROUP: tl.constexpr = tl.constexpr(GROUP)  # K values a scale (the packed K loops' SG)


@triton.jit
def _e4m3_to_fp32(s):
    # e4m3 bits (uint8) -> fp16 bits with the same exponent field and mantissa (sign to bit 15, exponent and
    # mantissa to bits 7-13): fp16's bias is 8 more than e4m3's, so its value is the scale / 2**8, subnormals
    # included (e4m3's 2**-6 * m/8 is fp16's 2**-14 * m/8). Exact; no fp8 type is needed, so masked loads fill
    # with an integer 0 and the interpreter runs it.
    s = s.to(tl.int16)
    h = ((s & 0x80) << 8) | ((s & 0x7F) << 7)
    return h.to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def nvfp4_dequant_tile(q, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
    """Packed e2m1 bytes q [BN, BK/2] (uint8) + e4m3 scales s [BN, BK/16] (their bytes, uint8) -> the [BK, BN] B
    tile in dtype (without the global scale)."""
    q = q.to(tl.int32)
    c = tl.reshape(tl.join(q & 0xF, q >> 4), [BLOCK_N, BLOCK_K])  # low nibble = even element
    mag = c & 7
    # e2m1 -> fp32 bits: codes 2-7 are 2**(e-1) * (1 + m/2) = exponent (mag >> 1) + 126, mantissa bit at 22;
    # code 1 is 0.5 (0x3F000000), code 0 is 0; the sign bit 3 goes to bit 31.
    bits = tl.where(mag >= 2, (mag << 22) + 0x3F000000, tl.where(mag == 1, 0x3F000000, 0)) | ((c & 8) << 28)
    v = tl.reshape(bits.to(tl.float32, bitcast=True), [BLOCK_N, BLOCK_K // 16, 16])
    w = tl.reshape(v * _e4m3_to_fp32(s)[:, :, None], [BLOCK_N, BLOCK_K])
    return tl.trans(w.to(dtype))


@triton.jit
def nvfp4_dot(a, w, acc, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FMT: tl.constexpr, INTERPRET: tl.constexpr,
              PREC: tl.constexpr):
    """DOT of NVFP4 (kernels/triton_moe_packed.py), FMT[5:] = (NATIVE, A_FORMAT); w = (q, s) of `scaled_tile`:
    [BN, BK/2] bytes and their [BN, BK/16] e4m3 scales' bytes (the global scale is the loop's, after it)."""
    q, s = w
    NATIVE: tl.constexpr = FMT[5]
    A_FORMAT: tl.constexpr = FMT[6]
    if NATIVE:
        return tl.dot_scaled(a, None, A_FORMAT, tl.trans(q), s.to(tl.float8e4nv, bitcast=True), "e2m1", acc)
    return dot(a, nvfp4_dequant_tile(q, s, BLOCK_N, BLOCK_K, a.dtype), acc, INTERPRET, PREC)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_nvfp4_up_kernel(x_ptr, wq_ptr, ws_ptr, wg_ptr, h_ptr, sorted_ptr, expert_ids_ptr, b13_ptr, num_pairs,
                         num_rows, inter, hidden, top_k, stride_xt, stride_qe, stride_qn, stride_se, stride_sn,
                         stride_ss, stride_ge, stride_hr, stride_be, alpha, limit, num_rows_ptr, num_experts,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PERSISTENT: tl.constexpr,
                         TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr,
                         A_FORMAT: tl.constexpr):
    # (num_rows_ptr, num_experts: the pipeline's, for PERSISTENT and TMA, which NVFP4 runs without; last, as MXFP4)
    sorted_up_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, inter, hidden), num_rows_ptr, num_rows,
                   (b13_ptr, stride_be, alpha, limit), (x_ptr, stride_xt),
                   (wq_ptr, ws_ptr, ws_ptr, wg_ptr, stride_qe, stride_qn, stride_se, stride_sn, stride_ss, stride_ge),
                   (h_ptr, stride_hr), packed_up_loop, store_h,
                   (scaled_tile, nvfp4_dot, 2, SCALE_GROUP, True, NATIVE, A_FORMAT), BLOCK_M, BLOCK_N, BLOCK_K,
                   GROUP_M, EVEN_K, HAS_BIAS, ACT, PERSISTENT, TMA, INTERPRET, PREC)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_nvfp4_down_kernel(h_ptr, wq_ptr, ws_ptr, wg_ptr, y_ptr, sorted_ptr, expert_ids_ptr, weights_ptr, b2_ptr,
                           num_pairs, num_rows, hidden, inter, top_k, stride_hr, stride_qe, stride_qn, stride_se,
                           stride_sn, stride_ss, stride_ge, stride_yr, stride_be, num_rows_ptr, num_experts,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                           PERSISTENT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
                           NATIVE: tl.constexpr, A_FORMAT: tl.constexpr):
    sorted_down_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, hidden, inter), num_rows_ptr, num_rows,
                     (b2_ptr, stride_be, weights_ptr, y_ptr, stride_yr), (h_ptr, stride_hr),
                     (wq_ptr, ws_ptr, ws_ptr, wg_ptr, stride_qe, stride_qn, stride_se, stride_sn, stride_ss, stride_ge),
                     packed_down_loop, (scaled_tile, nvfp4_dot, 2, SCALE_GROUP, True, NATIVE, A_FORMAT), BLOCK_M, BLOCK_N,
                     BLOCK_K, GROUP_M, EVEN_K, ATOMIC, HAS_BIAS, PERSISTENT, TMA, INTERPRET, PREC)


def _triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


# tl.dot_scaled's upcast operand beside an fp32 accumulator: past this many accumulator values per thread the
# native down GEMM spilled (sm_100, Triton 3.9: 128 x 256 at 8 warps, 255 registers and 112 bytes of spill).
NATIVE_MAX_ACC = 64


def nvfp4_config(cfg: MoELaunchConfig, native: bool = False) -> MoELaunchConfig:
    """The float kernel's launch config with BLOCK_SIZE_K at least 32 (two scale groups: the byte tile is
    BLOCK_K/2 wide and tl.dot wants K >= 16 on both sides); FUSED_GATE_UP is ignored here (two dots). `native`:
    the down GEMM's BLOCK_SIZE_N halved until its accumulator holds at most NATIVE_MAX_ACC values a thread (the
    gate-up GEMM compiled without spills at every default bucket, its two accumulators included)."""
    bm = cfg.BLOCK_SIZE_M
    bk = lambda g: max(2 * GROUP, g.BLOCK_SIZE_K)  # noqa: E731
    bn = cfg.down.BLOCK_SIZE_N
    while native and bn > 16 and bm * bn > NATIVE_MAX_ACC * 32 * cfg.down.num_warps:
        bn //= 2
    return MoELaunchConfig(bm, replace(cfg.up, BLOCK_SIZE_K=bk(cfg.up), FUSED_GATE_UP=False),
                           replace(cfg.down, BLOCK_SIZE_K=bk(cfg.down), BLOCK_SIZE_N=bn))


@dataclass(frozen=True)
class Nvfp4Format(PackedFormat):
    """NVFP4 experts: packed bytes, e4m3 block scales, per-expert global scales; `native` picks tl.dot_scaled for
    activations of dtype `a_format` (module docstring)."""

    w13q_EFB: torch.Tensor
    w13s_EFS: torch.Tensor
    w13g_E2: torch.Tensor
    w2q_EDB: torch.Tensor
    w2s_EDS: torch.Tensor
    w2g_E: torch.Tensor
    native: bool
    a_format: str
    KERNELS: ClassVar = (_moe_nvfp4_up_kernel, _moe_nvfp4_down_kernel)

    def fit(self, cfg: MoELaunchConfig) -> MoELaunchConfig:
        return nvfp4_config(cfg, self.native)

    def weight(self, up: bool) -> dict:
        """A GEMM's weight operands (bytes, scales, global scales and their strides) and this format's constexprs."""
        q, s, g = (self.w13q_EFB, self.w13s_EFS, self.w13g_E2) if up else (self.w2q_EDB, self.w2s_EDS, self.w2g_E)
        return dict(wq_ptr=q, ws_ptr=s, wg_ptr=g, stride_qe=q.stride(0), stride_qn=q.stride(1), stride_se=s.stride(0),
                    stride_sn=s.stride(1), stride_ss=s.stride(2), stride_ge=g.stride(0), NATIVE=self.native,
                    A_FORMAT=self.a_format)


def _check(x_TD, w13_q, w13_s, w13_g, w2_q, w2_s, w2_g, topk_weights_TK, topk_ids_TK) -> tuple[int, int, int]:
    common.check_dtype("x_TD", x_TD)
    check_nvfp4(w13_q, w13_s, "w13")
    check_nvfp4(w2_q, w2_s, "w2")
    if w13_q.dim() != 3 or w2_q.dim() != 3:
        raise ValueError(f"w13 {tuple(w13_q.shape)} / w2 {tuple(w2_q.shape)} are invalid: need [E, 2I, D/2] and "
                         "[E, D, I/2].")
    E, F, B13 = w13_q.shape
    D = x_TD.shape[1]
    if F % 2 or B13 * 2 != D or tuple(w2_q.shape) != (E, D, F // 4) or (F // 2) % GROUP or D % GROUP:
        raise ValueError(f"shapes x_TD={tuple(x_TD.shape)}, w13={tuple(w13_q.shape)}, w2={tuple(w2_q.shape)} do not "
                         f"fit: need w13 [E, 2I, D/2] and w2 [E, D, I/2] with D and I multiples of {GROUP}.")
    _check_globals(w13_g, w2_g, E)
    if w13_g.dtype != torch.float32 or w2_g.dtype != torch.float32:
        raise ValueError(f"global scales of dtype {w13_g.dtype}/{w2_g.dtype} are invalid: weight_scale_2 is float32.")
    check_routing(x_TD, topk_weights_TK, topk_ids_TK)
    return E, F // 2, D


def triton_fused_moe_nvfp4(x_TD: torch.Tensor, w13_q_EFB: torch.Tensor, w13_scale_EFS: torch.Tensor,
                           w13_scale2_E2: torch.Tensor, w2_q_EDB: torch.Tensor, w2_scale_EDS: torch.Tensor,
                           w2_scale2_E: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                           expert_map_G: torch.Tensor | None = None, *, b13_EF: torch.Tensor | None = None,
                           b2_ED: torch.Tensor | None = None, activation: MoEActivation = SILU,
                           out: torch.Tensor | None = None, config: MoELaunchConfig | None = None, combine: str = "sum",
                           native: bool = False) -> torch.Tensor:
    """Same contract as `reference_fused_moe_nvfp4`: [T, D] in x's dtype (fp32, bf16, fp16); rows whose experts
    are all remote are 0. `out`, `config` and `combine` as `triton_fused_moe`; `native=True` takes the
    tl.dot_scaled path (module docstring; bf16/fp16 activations only). No device→host sync."""
    E, I, _ = _check(x_TD, w13_q_EFB, w13_scale_EFS, w13_scale2_E2, w2_q_EDB, w2_scale_EDS, w2_scale2_E,
                     topk_weights_TK, topk_ids_TK)
    a_format = native_a_format(x_TD.dtype, native)
    if native and _triton_version() < (3, 9):
        raise ValueError(f"native=True is invalid with Triton {triton.__version__}: its compiler fails on tl.dot_scaled "
                         "with e4m3 scales (module docstring); it needs Triton >= 3.9, or use native=False.")
    r = routed(x_TD, topk_weights_TK, topk_ids_TK, E, I, b13_EF, b2_ED, activation, out, combine)
    if r.T == 0:
        return r.out
    rows = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731  (K-contiguous bytes and scales)
    u8 = lambda t: rows(t).view(torch.uint8)  # noqa: E731  (the kernels decode e4m3 from its bits)
    fmt = Nvfp4Format(E, I, rows(w13_q_EFB), u8(w13_scale_EFS), w13_scale2_E2.contiguous(), rows(w2_q_EDB),
                      u8(w2_scale_EDS), w2_scale2_E.contiguous(), bool(native), a_format)
    return r.sorted(fmt, expert_map_G, config or get_moe_config(E, I, r.T, r.K, x_TD.device), combine)
