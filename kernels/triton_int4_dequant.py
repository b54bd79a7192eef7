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
"""
from __future__ import annotations

import triton
import triton.language as tl

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
