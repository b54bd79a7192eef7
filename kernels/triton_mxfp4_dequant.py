"""MXFP4 → float in Triton: the word-wise e2m1 decoding the MXFP4 GEMVs share (kernels/triton_moe_mxfp4_tiny.py),
and the prefill pre-pass that dequantizes every local expert once per call (kernels/triton_moe_mxfp4.py, `DEQUANT`).

Legend: E local experts, N output channels (rows), K reduction dim, S = K / 32 scale groups, W = K / 8 int32 words.

Decoding by words (`e2m1_slots`): the packed bytes are read as int32 words, 4 bytes = 8 e2m1 codes; byte j holds
element 2j in its low nibble (kernels/mxfp4.py). Four shift-and-mask steps turn a word into four uint32s, each
two fp16 bit patterns: slot j holds elements j (low half) and j + 4 (high half). A code (sign s, exponent e,
mantissa m) placed at fp16 bits 15 / 11-10 / 9 is the fp16 number e2m1 × 2**-14 exactly, subnormal codes
included (code 1: fp16 subnormal 2**-15 = 0.5 × 2**-14), so no compare or select is needed; the fp16 → fp32
convert is exact (on sm_80+ it issues on the FMA pipe). That is ~2 integer ops per value (a per-code
compare-and-select decode spends ~10): decode work, not bytes, bounds an MXFP4 GEMV on CUDA cores and the
per-tile MMA path (`dequant_words` serves both that and the pre-pass).
The scale 2**(s - 127) (`e8m0_to_fp32`, built from its bits) and the 2**14 are applied afterwards, in fp32.

The pre-pass (`dequantize_experts`): grid (E, N / BLOCK_N, K / BLOCK_K), one [BLOCK_N, BLOCK_K] tile a program,
written in natural element order (the four slots are joined back: slot j's halves are elements j and j + 4, so
the three-level join of `dequant_words` flattened row-major is elements 0..7). Value × 2**14 × 2**(s - 127) in
fp32 is exact (at most 2 significant bits) unless it leaves fp32's range, then one rounding to the output
dtype: the same arithmetic as `mxfp4_dequantize` (ldexp in fp32, then cast), bit for bit (tests check it).
Memory-bound: 17/32 byte read and 2 bytes (bf16) written per value.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .mxfp4 import GROUP, _check_packed
from .triton_common import cast

PREPASS_BLOCK_N, PREPASS_BLOCK_K = 16, 512  # 4 KB of bytes a program; K is padded by masks (2880 = 5.6 x 512)


@triton.jit
def e8m0_to_fp32(s):
    """2**(s - 127) from its bits; s = 0 is 2**-127, a float32 subnormal (mantissa bit 22), not 0."""
    s = s.to(tl.int32)
    return tl.where(s == 0, 0x00400000, s << 23).to(tl.float32, bitcast=True)


@triton.jit
def e2m1_slots(w):
    """int32 words of 8 packed e2m1 codes -> 4 uint32 words of two fp16 patterns (e2m1 × 2**-14): slot j holds
    elements (j, j + 4) of the word in its (low, high) half (module docstring)."""
    u = w.to(tl.uint32, bitcast=True)
    m, s = 0x0E000E00, 0x80008000  # fp16 exponent-and-mantissa bits 11-9 and the sign bit 15, in both halves
    s0 = ((u << 9) & m) | ((u << 12) & s)  # low nibbles of bytes 0 and 2: elements 0 and 4
    s1 = ((u << 5) & m) | ((u << 8) & s)  # high nibbles of bytes 0 and 2: elements 1 and 5
    s2 = ((u << 1) & m) | ((u << 4) & s)  # low nibbles of bytes 1 and 3: elements 2 and 6
    s3 = ((u >> 3) & m) | (u & s)  # high nibbles of bytes 1 and 3: elements 3 and 7
    return s0, s1, s2, s3


@triton.jit
def half_f32(u, HIGH: tl.constexpr):
    """One fp16 half of a uint32 slot word as fp32 (exact)."""
    b = (u >> 16) if HIGH else (u & 0xFFFF)
    return b.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _slot_join(s0l, s0h, s1l, s1h, s2l, s2h, s3l, s3h):
    """A word's 8 decoded values (slot j's low / high half) as [..., 2, 2, 2] in natural element order, for the
    checkpoint's nibble order: slot j holds elements (j, j + 4). The last join makes the fastest axis, so element
    4a + 2b + c of a word sits at [a, b, c] when slot 2b + c supplies (a = 0: low half, a = 1: high half); the
    halves of one slot land 4 elements apart, so packing bf16 pairs takes byte permutes (PRMT)."""
    return tl.join(tl.join(tl.join(s0l, s0h), tl.join(s2l, s2h)), tl.join(tl.join(s1l, s1h), tl.join(s3l, s3h)))


@triton.jit
def _pair_join(s0l, s0h, s1l, s1h, s2l, s2h, s3l, s3h):
    """The same for mxfp4.to_pair_order's nibble order, slot j holding elements (2j, 2j + 1): the halves of one slot
    are neighbours (the outermost join, the fastest axis), so a slot word is already a packed pair (no PRMT)."""
    return tl.join(tl.join(tl.join(s0l, s2l), tl.join(s1l, s3l)), tl.join(tl.join(s0h, s2h), tl.join(s1h, s3h)))


@triton.jit
def dequant_words(q, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIRS: tl.constexpr = False):
    """int32 words q [BN, BK/8] (8 e2m1 codes each) + E8M0 scales s [BN, BK/32] -> the [BN, BK] tile in fp32,
    natural element order, exact (module docstring): what the pre-pass stores and the per-tile K loops feed to
    tl.dot, at ~2 integer ops a value. PAIRS: the words are in mxfp4.to_pair_order's nibble order."""
    s0, s1, s2, s3 = e2m1_slots(q)
    if PAIRS:
        v = _pair_join(half_f32(s0, False), half_f32(s0, True), half_f32(s1, False), half_f32(s1, True),
                       half_f32(s2, False), half_f32(s2, True), half_f32(s3, False), half_f32(s3, True))
    else:
        v = _slot_join(half_f32(s0, False), half_f32(s0, True), half_f32(s1, False), half_f32(s1, True),
                       half_f32(s2, False), half_f32(s2, True), half_f32(s3, False), half_f32(s3, True))
    v = tl.reshape(v, [BLOCK_N, BLOCK_K // 32, 32])
    # times 2**14 (exact), then the scale: two products, as 2**(s - 113) would overflow fp32 for s > 240
    return tl.reshape((v * 16384.0) * e8m0_to_fp32(s)[:, :, None], [BLOCK_N, BLOCK_K])


@triton.jit
def e2m1_bf16_slots(w):
    """int32 words of 8 packed e2m1 codes -> 4 uint32 words of two bf16 patterns (e2m1 × 2**-126): slot j holds
    elements (j, j + 4) of the word in its (low, high) half, as `e2m1_slots` but at bf16's bit places (sign 15,
    exponent 8-7, mantissa 6: code 1 is the bf16 subnormal 2**-127 = 0.5 × 2**-126, exact)."""
    u = w.to(tl.uint32, bitcast=True)
    m, s = 0x01C001C0, 0x80008000  # bf16 exponent-and-mantissa bits 8-6 and the sign bit 15, in both halves
    s0 = ((u << 6) & m) | ((u << 12) & s)  # low nibbles of bytes 0 and 2: elements 0 and 4
    s1 = ((u << 2) & m) | ((u << 8) & s)  # high nibbles of bytes 0 and 2: elements 1 and 5
    s2 = ((u >> 2) & m) | ((u << 4) & s)  # low nibbles of bytes 1 and 3: elements 2 and 6
    s3 = ((u >> 6) & m) | (u & s)  # high nibbles of bytes 1 and 3: elements 3 and 7
    return s0, s1, s2, s3


@triton.jit
def _half_bf16(u, f, HIGH: tl.constexpr, INTERPRET: tl.constexpr):
    """One bf16 half of a uint32 slot word times 2**126 times f (the group's 2**(s - 127)): two exact products."""
    if INTERPRET:
        # The interpreter's bf16 arithmetic is not IEEE (its products of bit-cast bf16 came out as garbage, and
        # its fp32 -> bf16 flushes subnormals): the same two products in fp32, the bf16 pattern being the top half
        # of fp32's (exact, subnormal included), and the exact product's top half back (its low half is zero).
        b = (u & 0xFFFF0000) if HIGH else (u << 16)
        p = (b.to(tl.float32, bitcast=True) * 8.507059173023462e37) * f
        v = (p.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        b = (u >> 16) if HIGH else (u & 0xFFFF)
        two126 = tl.full(b.shape, 0x7E80, tl.uint16).to(tl.bfloat16, bitcast=True)
        v = (b.to(tl.uint16).to(tl.bfloat16, bitcast=True) * two126) * f
    return v


@triton.jit
def e8m0_to_bf16(s):
    """2**(s - 127) as bf16 from its bits (s <= 254); s = 0 is 2**-127, the bf16 subnormal 0x0040, not 0."""
    s = s.to(tl.int32)
    return tl.where(s == 0, 0x0040, s << 7).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def dequant_words_bf16(q, s, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
                       PAIRS: tl.constexpr = False):
    """`dequant_words` straight to bf16: [BN, BK/8] int32 words + [BN, BK/32] E8M0 scales -> the [BN, BK] tile in
    bf16, natural element order, bit for bit mxfp4_dequantize(..., bf16) for scales 0..254 (module docstring). No
    fp32 on the way (compiled): ~2 integer ops a value place the bits, then two packed bf16 products (sm_90:
    HMUL2.BF16, one instruction a value for both): times 2**126 (exact: the subnormal patterns become the normal
    e2m1 values) and times the group's 2**(s - 127) (one rounding, exact unless it leaves bf16's range, as the
    reference's ldexp then cast). PAIRS: the words are in mxfp4.to_pair_order's nibble order (no PRMT)."""
    s0, s1, s2, s3 = e2m1_bf16_slots(q)
    if INTERPRET:
        f = e8m0_to_fp32(s)
    else:
        f = e8m0_to_bf16(s)  # [BN, BK/32]
    f = tl.reshape(tl.broadcast_to(f[:, :, None], [BLOCK_N, BLOCK_K // 32, 4]), [BLOCK_N, BLOCK_K // 8])
    a, b = _half_bf16(s0, f, False, INTERPRET), _half_bf16(s0, f, True, INTERPRET)
    c, d = _half_bf16(s1, f, False, INTERPRET), _half_bf16(s1, f, True, INTERPRET)
    e, g = _half_bf16(s2, f, False, INTERPRET), _half_bf16(s2, f, True, INTERPRET)
    h, i = _half_bf16(s3, f, False, INTERPRET), _half_bf16(s3, f, True, INTERPRET)
    if PAIRS:
        v = _pair_join(a, b, c, d, e, g, h, i)
    else:
        v = _slot_join(a, b, c, d, e, g, h, i)
    return tl.reshape(v, [BLOCK_N, BLOCK_K])


@triton.jit
def _mxfp4_dequant_kernel(q_ptr, s_ptr, w_ptr, rows, groups, stride_qe, stride_qn, stride_se, stride_sn, stride_we,
                          stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr,
                          PAIRS: tl.constexpr = False):
    e = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_g = tl.program_id(2) * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    offs_w = tl.program_id(2) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    n_ok = (offs_n < rows)[:, None]
    rows_n = offs_n.to(tl.int64)[:, None]
    q = tl.load(q_ptr + e * stride_qe + rows_n * stride_qn + offs_w[None, :], mask=n_ok & (offs_w < groups * 4)[None, :],
                other=0)
    sc = tl.load(s_ptr + e * stride_se + rows_n * stride_sn + offs_g[None, :], mask=n_ok & (offs_g < groups)[None, :],
                 other=0)
    vals = dequant_words(q, sc, BLOCK_N, BLOCK_K, PAIRS)
    offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
    out = w_ptr + e * stride_we + rows_n * stride_wn + offs_k[None, :]
    tl.store(out, cast(vals, w_ptr.dtype.element_ty, INTERPRET), mask=n_ok & (offs_k < groups * 32)[None, :])


def dequantize_experts(blocks_ENSQ: torch.Tensor, scales_ENS: torch.Tensor, dtype: torch.dtype,
                       out: torch.Tensor | None = None, pairs: bool = False) -> torch.Tensor:
    """blocks uint8 [E, N, S, 16] + scales uint8 [E, N, S] -> [E, N, K = 32 S] in `dtype` (fp32, bf16, fp16),
    equal to `mxfp4_dequantize(blocks, scales, dtype)`. `out` ([E, N, K], `dtype`, rows contiguous) is written
    when given; `pairs`: the blocks are in mxfp4.to_pair_order's nibble order. One launch, no host sync."""
    _check_packed(blocks_ENSQ, scales_ENS)
    if blocks_ENSQ.dim() != 4:
        raise ValueError(f"blocks {tuple(blocks_ENSQ.shape)} is invalid: need [E, N, K/32, 16].")
    E, N, S, Q = blocks_ENSQ.shape
    K = S * GROUP
    if out is None:
        out = common.workspace((E, N, K), dtype, blocks_ENSQ.device)
    elif tuple(out.shape) != (E, N, K) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be [{E}, {N}, {K}], {dtype}, rows contiguous.")
    if out.numel() == 0:
        return out
    words = word_view(blocks_ENSQ)
    scales_ENS = scales_ENS if scales_ENS.stride(-1) == 1 else scales_ENS.contiguous()
    grid = (E, triton.cdiv(N, PREPASS_BLOCK_N), triton.cdiv(K, PREPASS_BLOCK_K))
    _mxfp4_dequant_kernel[grid](words, scales_ENS, out, N, S, words.stride(0), words.stride(1), scales_ENS.stride(0),
                          scales_ENS.stride(1), out.stride(0), out.stride(1), BLOCK_N=PREPASS_BLOCK_N,
                          BLOCK_K=PREPASS_BLOCK_K, INTERPRET=common.interpreting(out), PAIRS=pairs, num_warps=4)
    return out


def word_view(blocks_ENSQ: torch.Tensor) -> torch.Tensor:
    """[E, N, S, 16] uint8 -> [E, N, 4 S] int32 words (a view when the 16 bytes of a group are contiguous), the
    scale groups' stride 1 scale byte per 4 words."""
    E, N, S, Q = blocks_ENSQ.shape
    b = blocks_ENSQ
    if b.stride(-1) != 1 or b.stride(-2) != Q or b.storage_offset() % 4 or any(st % 4 for st in b.stride()[:2]):
        b = b.contiguous()
    return b.view(torch.int32).reshape(E, N, S * Q // 4)
