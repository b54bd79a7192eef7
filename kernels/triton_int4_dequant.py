"""INT4 → float in Triton: the word-wise nibble decoding the INT4 fused MoE's GEMVs and tiles share
(kernels/triton_moe_int4_tiny.py, kernels/triton_moe_int4.py). Layout: kernels/int4.py.

Legend: N output channels (rows), K reduction dim, W = K / 8 int32 words of a row, G the group size.

Decoding by words (`int4_slots`): a word holds elements 8w .. 8w+7 at bits 4j (compressed-tensors' packing). Four
shift-and-mask steps, each with an OR of 0x6400 into both halves, turn it into four uint32s, each two fp16 bit
patterns: slot j holds elements j (low half, bits 4j) and j + 4 (high half, bits 16 + 4j), as fp16 numbers 1024 + u
exactly (0x6400 is 1024 and a nibble fills the low mantissa bits: the magic-number decode of FasterTransformer's and
Marlin's int4 kernels). The fp16 → fp32 convert is exact, so (half - (1024 + z)) is the exact small integer u - z
and one product by the group's scale the weight, in fp32: ~2 integer ops a value, no compare or select. The slot
structure is MXFP4's (kernels/triton_mxfp4_dequant.py: slot j = elements j and j + 4), so the tiles are joined back
to natural order the same way.

The prefill pre-pass (`dequantize_int4_experts`, the "dequant" path of kernels/triton_moe_int4.py): grid (E,
N / BLOCK_N, K / BLOCK_K), the same word decode, written in natural order in the activation dtype into a
`DequantWorkspace` buffer, which the float sorted GEMMs then read as bf16 experts.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .int4 import check_int4
from .triton_common import cast
from .triton_mxfp4_dequant import half_f32


@triton.jit
def int4_slots(w):
    """int32 words of 8 nibbles -> 4 uint32 words of two fp16 patterns 1024 + u: slot j holds elements (j, j + 4)."""
    u = w.to(tl.uint32, bitcast=True)
    m, e = 0x000F000F, 0x64006400  # a nibble in each half, and fp16's 1024 in each half
    s0 = (u & m) | e
    s1 = ((u >> 4) & m) | e
    s2 = ((u >> 8) & m) | e
    s3 = ((u >> 12) & m) | e
    return s0, s1, s2, s3


@triton.jit
def group_of_words(k0, BLOCK_K: tl.constexpr, GROUP: tl.constexpr):
    """The group index of each word of the K step starting at element k0: [BLOCK_K / 8] (a group's words share its
    scale and zero point; with GROUP < BLOCK_K a step holds several groups)."""
    return (k0 + tl.arange(0, BLOCK_K // 8) * 8) // GROUP


@triton.jit
def dequant_int4_words(q, s, z, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """int32 words q [BN, BK/8] + each word's scale s [BN, BK/8] and zero point z [BN, BK/8] (fp32, z = 8 when
    symmetric) -> the [BN, BK] tile in fp32, natural element order, exact (module docstring)."""
    s0, s1, s2, s3 = int4_slots(q)
    # [BN, BW, 2, 2, 2]: element 4a + 2b + c of a word sits at [a, b, c] (slot 2b + c, half a): as dequant_words
    v = tl.join(tl.join(tl.join(half_f32(s0, False), half_f32(s0, True)), tl.join(half_f32(s2, False), half_f32(s2, True))),
                tl.join(tl.join(half_f32(s1, False), half_f32(s1, True)), tl.join(half_f32(s3, False), half_f32(s3, True))))
    c = (z + 1024.0)[:, :, None, None, None]
    v = (v - c) * s[:, :, None, None, None]
    return tl.reshape(v, [BLOCK_N, BLOCK_K])


# The prefill pre-pass (`dequantize_int4_experts`): one [BLOCK_N, BLOCK_K] tile a program, 2 KB of words.
PREPASS_BLOCK_N, PREPASS_BLOCK_K = 16, 256


@triton.jit
def _int4_dequant_kernel(q_ptr, s_ptr, z_ptr, w_ptr, rows, words, stride_qe, stride_qn, stride_se, stride_sn,
                         stride_we, stride_wn, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr):
    e = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(2) * BLOCK_K
    offs_w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    groups = group_of_words(k0, BLOCK_K, GROUP)
    ok = (offs_n < rows)[:, None] & (offs_w < words)[None, :]
    rows_n = offs_n.to(tl.int64)[:, None]
    q = tl.load(q_ptr + e * stride_qe + rows_n * stride_qn + offs_w[None, :], mask=ok, other=0)
    s = tl.load(s_ptr + e * stride_se + rows_n * stride_sn + groups[None, :], mask=ok, other=0).to(tl.float32)
    if HAS_ZP:
        z = tl.load(z_ptr + e * stride_se + rows_n * stride_sn + groups[None, :], mask=ok, other=0).to(tl.float32)
    else:
        z = tl.full([BLOCK_N, BLOCK_K // 8], 8.0, tl.float32)
    vals = dequant_int4_words(q, s, z, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = w_ptr + e * stride_we + rows_n * stride_wn + offs_k[None, :]
    tl.store(out, cast(vals, w_ptr.dtype.element_ty, INTERPRET), mask=(offs_n < rows)[:, None] & (offs_k < words * 8)[None, :])


def dequantize_int4_experts(q_ENW: torch.Tensor, s_ENS: torch.Tensor, z_ENS: torch.Tensor | None, dtype: torch.dtype,
                            out: torch.Tensor | None = None) -> torch.Tensor:
    """q int32 [E, N, K/8] + scales [E, N, K/G] (+ zero points uint8 [E, N, K/G]) -> [E, N, K] in `dtype` (fp32,
    bf16, fp16), equal to `int4_dequantize(q, s, z, dtype)` bit for bit ((u - z) * s in fp32, one rounding). `out`
    ([E, N, K], `dtype`, rows contiguous; a workspace's view) is written when given. One launch, no host sync.
    Memory-bound: 1/2 byte of word, 1/G of a scale (and zero point) read and 2 bytes (bf16) written per value."""
    group = check_int4(q_ENW, s_ENS, z_ENS)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} is invalid: the pre-pass writes float32, bfloat16 or float16.")
    if q_ENW.dim() != 3:
        raise ValueError(f"q {tuple(q_ENW.shape)} is invalid: need [E, N, K/8].")
    E, N, W = q_ENW.shape
    K = W * 8
    if out is None:
        out = common.workspace((E, N, K), dtype, q_ENW.device)
    elif tuple(out.shape) != (E, N, K) or out.dtype != dtype or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be [{E}, {N}, {K}], {dtype}, rows "
                         "contiguous.")
    if out.numel() == 0:
        return out
    rows = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    q, s = rows(q_ENW), rows(s_ENS)
    z = s if z_ENS is None else rows(z_ENS)
    if z_ENS is not None and z.stride()[:2] != s.stride()[:2]:  # (the kernel indexes both with the scales' strides)
        s, z = s.contiguous(), z.contiguous()
    grid = (E, triton.cdiv(N, PREPASS_BLOCK_N), triton.cdiv(K, PREPASS_BLOCK_K))
    _int4_dequant_kernel[grid](q, s, z, out, N, W, q.stride(0), q.stride(1), s.stride(0), s.stride(1), out.stride(0),
                               out.stride(1), GROUP=group, HAS_ZP=z_ENS is not None, BLOCK_N=PREPASS_BLOCK_N,
                               BLOCK_K=PREPASS_BLOCK_K, INTERPRET=common.interpreting(out), num_warps=4)
    return out


class DequantWorkspace:
    """The reused buffers the dequantize-once path writes an MoE layer's experts into: one per operand name, grown
    when a call needs more (never shrunk), so every layer of a model (same shapes) reuses the same memory, one
    layer at a time. Owned by a rank's `TritonKernels` (kernels/ops.py), handed to each call: no module state.
    Calls on one stream only (a layer's pass and GEMMs are stream-ordered; two-batch overlap computes on one
    stream too)."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A [shape] `dtype` view of buffer `name` (contents undefined), reallocated only to grow or move."""
        numel = math.prod(shape)
        buf, dev = self._buffers.get(name), torch.device(device)
        moved = buf is not None and (buf.device.type != dev.type or dev.index not in (None, buf.device.index))
        if buf is None or moved or buf.dtype != dtype or buf.numel() < numel:
            buf = common.workspace((max(numel, 1),), dtype, device)
            self._buffers[name] = buf
        return buf[:numel].view(shape)

    def nbytes(self) -> int:
        """Bytes held (the start-up report and tests read it)."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
