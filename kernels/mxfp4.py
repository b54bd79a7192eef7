"""MXFP4 expert weights as gpt-oss publishes them: the plain-torch reference, which is also the CPU path and the
oracle of the Triton kernels (kernels/triton_moe_mxfp4.py).

Legend: N output channels, K input channels (the GEMM's reduction dim), S = K / 32 scale groups, Q = 16 packed
bytes per group, E local experts, D hidden, I expert intermediate size, F = 2I, T tokens, K* top-k.

Published layout (`quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}`; per layer
`mlp.experts.gate_up_proj_{blocks,scales,bias}` and `mlp.experts.down_proj_{blocks,scales,bias}`), as
transformers' `integrations/mxfp4.py::_convert_moe_packed_tensors` reads it (every fact below is checked
against that function by tests/kernels/test_mxfp4.py, bit for bit):
- `*_blocks` uint8 [E, N, S, Q]: row n of the [N, K] weight (output-channel major, like nn.Linear), its K values
  in groups of 32, two e2m1 (FP4: 1 sign, 2 exponent, 1 mantissa bit) codes per byte, the *low* nibble first:
  byte j of a group holds element 2j in bits 0-3 and element 2j+1 in bits 4-7.
- `*_scales` uint8 [E, N, S]: one E8M0 exponent per group of 32 (bias 127): the group's values are
  e2m1(code) * 2**(scale - 127).
- e2m1 codes 0-7 are +0, 0.5, 1, 1.5, 2, 3, 4, 6 and codes 8-15 the same values negated (FP4_VALUES).
- gate_up_proj is [F, D] per expert with gate and up *interleaved* along its rows (row 2i gate channel i, row
  2i+1 up channel i; transformers' GptOssExperts._apply_gate takes `[..., ::2]` / `[..., 1::2]` of the output);
  down_proj is [D, I]. transformers transposes the dequantized [E, N, K] to its float parameter layout [E, K, N];
  moelink keeps [E, N, K] (w13_EFD, w2_EDI of kernels/moe.py).
- biases stay float (bf16 in the published files): gate_up_proj_bias [E, F] (interleaved like the rows),
  down_proj_bias [E, D].

Where the gate/up interleave goes: `deinterleave_gate_up` is a row permutation, and permuting the rows of
blocks, scales and bias together is exact (each row carries its own bytes and scales), so the loader applies it
once at load time and every kernel (this reference, the Triton MXFP4 MoE) sees w13 as [gate; up] rows, the
layout of kernels/moe.py.
"""
from __future__ import annotations

import torch

from .moe import SILU, MoEActivation, reference_fused_moe

GROUP = 32  # values per E8M0 scale (the OCP MX block size)
SCALE_BIAS = 127
# e2m1 code -> value; the low nibble of a byte is the even element (transformers' FP4_VALUES, same order).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_MAX = 6.0
# Midpoints between consecutive non-negative e2m1 values: a magnitude above midpoint i rounds to code i+1.
# At a tie, round-to-nearest-even keeps the code whose mantissa bit is 0 (the even code).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _check_packed(blocks: torch.Tensor, scales: torch.Tensor, what: str = "blocks") -> None:
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"{what}: blocks.dtype={blocks.dtype} / scales.dtype={scales.dtype} are invalid: MXFP4 "
                         "blocks and E8M0 scales are both torch.uint8.")
    if blocks.dim() < 3 or blocks.shape[-1] != GROUP // 2 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise ValueError(f"{what}: blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not fit: need "
                         f"blocks [..., N, K/32, 16] and scales [..., N, K/32].")


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [..., N, S, 16] + scales uint8 [..., N, S] -> [..., N, K = 32 S] in `dtype`.

    The same arithmetic as transformers' dequantization (value looked up in `dtype`, then ldexp by scale - 127),
    so the result is bit-identical to it for every dtype (tests check bf16, fp16, fp32 and fp64).
    """
    _check_packed(blocks, scales)
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    lo = lut[(blocks & 0x0F).long()]
    hi = lut[(blocks >> 4).long()]
    vals = torch.stack((lo, hi), dim=-1).flatten(-2)  # [..., N, S, 32]: low nibble first
    # ldexp by an int32 exponent computes in float32 (or wider), then one rounding to `dtype`: as transformers does
    vals = torch.ldexp(vals, (scales.to(torch.int32) - SCALE_BIAS)[..., None]).to(dtype)
    return vals.flatten(-2)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] (K a multiple of 32) -> (blocks uint8 [..., N, K/32, 16], scales uint8 [..., N, K/32]).

    Each group of 32 gets the smallest power-of-two scale that maps its largest magnitude into [0, 6]
    (2**ceil(log2(amax / 6)), as triton_kernels' downcast_to_mxfp rounds the scale up: nothing saturates), and
    every value is rounded to the nearest e2m1 value (ties to the even code). An all-zero group gets scale 2**-127.
    Used by tests and tools to write checkpoints in the published layout.
    """
    if w.shape[-1] % GROUP or w.dim() < 2:
        raise ValueError(f"w of shape {tuple(w.shape)} is invalid for MXFP4: need [..., N, K] with K a multiple of {GROUP}.")
    if not w.dtype.is_floating_point:
        raise ValueError(f"w.dtype={w.dtype} is invalid: MXFP4 quantizes a floating-point weight.")
    w = w.to(torch.float64)  # exact for every source dtype: the scale search and rounding see the true values
    if not bool(torch.isfinite(w).all()):  # host sync: a tool-time check
        raise ValueError("w holds NaN or inf: MXFP4 has no encoding for them.")
    *lead, n, k = w.shape
    g = w.reshape(*lead, n, k // GROUP, GROUP)
    amax = g.abs().amax(dim=-1)
    mant, exp = torch.frexp(amax / FP4_MAX)  # amax/6 = mant * 2**exp, mant in [0.5, 1)
    e = torch.where(mant > 0.5, exp, exp - 1)  # ceil(log2(amax / 6)); exact powers of two stay
    e = torch.where(amax > 0, e, torch.full_like(e, -SCALE_BIAS)).clamp(-SCALE_BIAS, 254 - SCALE_BIAS)
    mag = g.abs() / torch.ldexp(torch.ones_like(amax), e)[..., None]
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for i, m in enumerate(_MIDPOINTS):  # count the midpoints below |v| (at a tie: up only onto an even code)
        code += (mag >= m if i % 2 else mag > m).to(torch.uint8)
    code |= (g < 0).to(torch.uint8) << 3
    packed = code[..., 0::2] | (code[..., 1::2] << 4)
    return packed.contiguous(), (e + SCALE_BIAS).to(torch.uint8).contiguous()


def deinterleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """Rows [g0, u0, g1, u1, ...] (gpt-oss's gate_up_proj, along dim 1 of [E, F, ...]) -> [g0, g1, ...; u0, u1, ...].

    Works on blocks [E, F, S, Q], scales [E, F, S] and bias [E, F] alike: the load-time permutation that gives the
    kernels [gate; up] rows (module docstring)."""
    if t.dim() < 2 or t.shape[1] % 2:
        raise ValueError(f"gate_up tensor of shape {tuple(t.shape)} is invalid: need [E, F, ...] with F = 2I even.")
    return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1).contiguous()


def reference_fused_moe_mxfp4(x_TD: torch.Tensor, w13_blocks_EFSQ: torch.Tensor, w13_scales_EFS: torch.Tensor,
                              w2_blocks_EDSQ: torch.Tensor, w2_scales_EDS: torch.Tensor, topk_weights_TK: torch.Tensor,
                              topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None, *,
                              b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                              activation: MoEActivation = SILU) -> torch.Tensor:
    """`reference_fused_moe` with MXFP4 expert weights: dequantize to x's dtype, then the float reference.

    w13 is [E, F, D/32, 16] + [E, F, D/32] with [gate; up] rows (already de-interleaved, module docstring), w2
    is [E, D, I/32, 16] + [E, D, I/32]. Biases (float, any dtype) are cast to x's dtype. Returns [T, D] in x's
    dtype. With float64 x this is the exact oracle of the Triton kernel (dequantization is exact in float64).
    """
    _check_packed(w13_blocks_EFSQ, w13_scales_EFS, "w13")
    _check_packed(w2_blocks_EDSQ, w2_scales_EDS, "w2")
    dt = x_TD.dtype
    w13_EFD = mxfp4_dequantize(w13_blocks_EFSQ, w13_scales_EFS, dt)
    w2_EDI = mxfp4_dequantize(w2_blocks_EDSQ, w2_scales_EDS, dt)
    cast = lambda b: None if b is None else b.to(dt)  # noqa: E731
    return reference_fused_moe(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, expert_map_G,
                               b13_EF=cast(b13_EF), b2_ED=cast(b2_ED), activation=activation)


# A packed word's byte k holds, in mxfp4.to_pair_order's layout, the elements (_PAIR_LO[k], _PAIR_HI[k]) of the
# word's 8 (the checkpoint's byte k holds (2k, 2k + 1)): the Triton decode's slot j (the low nibbles of bytes 0 and
# 2, their high nibbles, then bytes 1 and 3's, kernels/triton_mxfp4_dequant.py) then holds elements (2j, 2j + 1),
# a packed pair in natural order, where the checkpoint's order gives (j, j + 4) and the tile needs byte permutes.
_PAIR_LO, _PAIR_HI = (0, 4, 1, 5), (2, 6, 3, 7)


def _nibbles(blocks: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 16] -> the 32 codes [..., 4 words, 8] in each layout's byte order (low nibble first)."""
    b = blocks.reshape(*blocks.shape[:-1], 4, 4)
    return torch.stack((b & 0x0F, b >> 4), dim=-1).reshape(*blocks.shape[:-1], 4, 8)


def _bytes(codes: torch.Tensor) -> torch.Tensor:
    """[..., 4 words, 8] codes, byte-order pairs -> uint8 [..., 16]."""
    pairs = codes.reshape(*codes.shape[:-1], 4, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).reshape(*codes.shape[:-2], 16)


def to_pair_order(blocks: torch.Tensor) -> torch.Tensor:
    """MXFP4 blocks uint8 [..., 16] (the checkpoint's nibble order) -> the same codes with each 4-byte word's nibbles
    permuted for the Triton decode (the kernels' `pair_order=True`): byte k = (element _PAIR_LO[k], _PAIR_HI[k]).
    Scales and rows unchanged; a byte permutation within each word, undone by `from_pair_order`."""
    e = _nibbles(blocks)  # natural element order: byte k = (2k, 2k + 1)
    order = torch.tensor([x for k in range(4) for x in (_PAIR_LO[k], _PAIR_HI[k])], device=blocks.device)
    return _bytes(e.index_select(-1, order))


def from_pair_order(blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of `to_pair_order`: the checkpoint's nibble order back."""
    p = _nibbles(blocks)  # position 2k + h holds element _PAIR_LO/HI[k]
    where = [0] * 8
    for k in range(4):
        where[_PAIR_LO[k]], where[_PAIR_HI[k]] = 2 * k, 2 * k + 1
    return _bytes(p.index_select(-1, torch.tensor(where, device=blocks.device)))
