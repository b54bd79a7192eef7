"""INT4 expert weights (W4A16, group-wise scales, optional zero points): the plain-torch reference, which is also the
CPU path and the oracle of the Triton kernels (kernels/triton_moe_int4.py).

Legend: N output channels, K input channels (the GEMM's reduction dim), W = K / 8 int32 words of a row, G the group
size, S = K / G groups, E local experts, D hidden, I expert intermediate size, F = 2I, T tokens, K* top-k.

The layout moelink holds is compressed-tensors' `pack-quantized` weight, as Kimi K2 Thinking / K2.5 publish their
experts (`weight_packed` int32 [N, K/8], `weight_scale` [N, K/G], `weight_shape`; group 32, symmetric):
- word w of row n holds elements 8w .. 8w+7 of that row, element 8w + j in bits 4j .. 4j+3 (compressed-tensors'
  `pack_to_int32`: dense packing, the lowest bits first; on a little-endian machine byte j of the word holds
  elements 2j (low nibble) and 2j + 1 (high nibble));
- a nibble u (0..15) is stored offset-binary: the signed integer is q = u - 8 (`pack_to_int32` adds 1 << (bits - 1));
- the real weight is (q - zp) * scale = (u - z) * scale with z = zp + 8 per (row, group): z = 8 for a symmetric
  checkpoint (compressed-tensors writes no zero point), else the checkpoint's `weight_zero_point` (int32
  [N/8, K/G], packed along N, offset-binary too) unpacked at load into uint8 `z` [N, K/G] (`unpack_rows`).
GPTQ and AWQ checkpoints are rewritten into this layout at load (engine/rank/int4_repack.py): GPTQ's qweight
[K/8, N] packs along K exactly so (transposed), its zero points are stored minus one (checkpoint_format "gptq":
z = stored + 1, up to 16, hence uint8); AWQ packs along N in the order [0, 2, 4, 6, 1, 3, 5, 7].

Scales are held in the model dtype (a bf16 scale, as Kimi publishes, is exact in bf16, fp32 and fp64; an fp16 GPTQ
scale served in bf16 is rounded once to bf16: vLLM's Marlin does the same). Dequantization computes (u - z) * s in
float32 (float64 for float64), then one rounding to the activation dtype: the Triton K loops do the same.
"""
from __future__ import annotations

import torch

from .moe import SILU, MoEActivation, reference_fused_moe

BITS = 4
PACK = 32 // BITS  # values per int32 word
SYMMETRIC_ZERO = 8  # z of a symmetric checkpoint (q = u - 8)
GROUP_SIZES = (32, 64, 128)  # published: Kimi 32; GPTQ / AWQ / llm-compressor W4A16 128


def check_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None = None, what: str = "weight") -> int:
    """q int32 [..., N, K/8], s float [..., N, K/G] (and z uint8 [..., N, K/G]); returns the group size G."""
    if q.dtype != torch.int32 or not s.dtype.is_floating_point or (z is not None and z.dtype != torch.uint8):
        raise ValueError(f"{what}: packed dtype={q.dtype}, scale dtype={s.dtype}, zero dtype="
                         f"{None if z is None else z.dtype} are invalid: INT4 packs 8 values per torch.int32 with float "
                         "scales and uint8 zero points.")
    k = q.shape[-1] * PACK if q.dim() >= 2 else 0
    if (q.dim() < 2 or s.shape[:-1] != q.shape[:-1] or s.shape[-1] == 0 or k % s.shape[-1]
            or (z is not None and z.shape != s.shape)):
        raise ValueError(f"{what}: packed {tuple(q.shape)}, scales {tuple(s.shape)}"
                         + ("" if z is None else f", zeros {tuple(z.shape)}")
                         + " do not fit: need [..., N, K/8] and [..., N, K/G] (G dividing K).")
    return k // s.shape[-1]


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> the nibbles u uint8 [..., 8 W] (element 8w + j from bits 4j of word w)."""
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32, device=q.device)
    return ((q[..., None] >> shifts) & 0xF).to(torch.uint8).flatten(-2)


def pack_int4(u: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles [..., K] (K a multiple of 8) -> int32 [..., K/8]: the inverse of `unpack_int4`."""
    if u.shape[-1] % PACK:
        raise ValueError(f"nibbles of shape {tuple(u.shape)} are invalid: the last dim must be a multiple of {PACK}.")
    v = u.to(torch.int64).reshape(*u.shape[:-1], -1, PACK)
    word = (v << torch.arange(0, 32, BITS, device=u.device)).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_rows(zp: torch.Tensor, rows: int) -> torch.Tensor:
    """compressed-tensors' packed zero points int32 [N/8, S] (packed along N: word w of group g holds rows 8w .. 8w+7
    at bits 4j, offset-binary) -> z uint8 [N, S] = zp + 8 (the nibble as stored)."""
    return unpack_int4(zp.transpose(-1, -2).contiguous()).transpose(-1, -2)[..., :rows, :].contiguous()


def gptq_qweight_rows(qweight: torch.Tensor) -> torch.Tensor:
    """GPTQ's qweight int32 [K/8, N] (8 consecutive K values a word, value 8r + j at bits 4j: compressed-tensors'
    packing along K) -> [N, K/8]: the transpose."""
    return qweight.transpose(-1, -2).contiguous()


def gptq_zeros_rows(qzeros: torch.Tensor, v1: bool) -> torch.Tensor:
    """GPTQ's qzeros int32 [S, N/8] (packed along N, column 8w + j at bits 4j) -> z uint8 [N, S]; checkpoint_format
    "gptq" (v1) stores zero - 1, so z = stored + 1 (16 fits uint8; v1's zero 0 cannot be written, by its design)."""
    z = unpack_int4(qzeros).transpose(-1, -2).contiguous()
    return z + 1 if v1 else z


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: slot j of a word holds column 8w + AWQ_ORDER[j]
_AWQ_INVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # column c of a word is in slot _AWQ_INVERSE[c]


def awq_to_rows(t: torch.Tensor, pack: bool) -> torch.Tensor:
    """AWQ's int32 [R, N/8] packed along N in AWQ_ORDER -> [N, R] nibbles in natural column order: packed along R
    into int32 [N, R/8] when `pack` (qweight, R = K), else uint8 [N, R] (qzeros, R = S groups)."""
    u = unpack_int4(t)  # [R, N] in slot order
    r, n = u.shape
    idx = (torch.arange(n, device=t.device) // PACK) * PACK + torch.tensor(_AWQ_INVERSE, device=t.device).repeat(n // PACK)
    rows = u[:, idx].transpose(0, 1).contiguous()
    return pack_int4(rows) if pack else rows


def int4_dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q int32 [..., N, K/8] + scales [..., N, K/G] (+ zero points uint8 [..., N, K/G], default 8) -> [..., N, K] in
    `dtype`: (u - z) * s computed in float32 (float64 for float64), exact there, then one rounding to `dtype`."""
    g = check_int4(q, s, z)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u = unpack_int4(q).to(work)
    zz = torch.full_like(s, SYMMETRIC_ZERO, dtype=work) if z is None else z.to(work)
    per = lambda t: t.to(work).repeat_interleave(g, dim=-1)  # noqa: E731
    return ((u - per(zz)) * per(s)).to(dtype)


def int4_quantize(w: torch.Tensor, group: int = 32, symmetric: bool = True, scale_dtype=torch.float32):
    """w [..., N, K] -> (q int32 [..., N, K/8], s [..., N, K/G], z uint8 [..., N, K/G] or None), the way
    compressed-tensors' min-max W4A16 does (symmetric: s = amax / 8, q = round(w / s) clamped to [-8, 7]; asymmetric:
    s = (max - min) / 15 over a range holding 0, z = -round(min / s) - 8 ... stored +8). For tests and tools; the
    tests' checkpoints are written by compressed-tensors itself (tests/helpers/int4_checkpoints.py)."""
    if w.dim() < 2 or w.shape[-1] % group or w.shape[-1] % PACK:
        raise ValueError(f"w of shape {tuple(w.shape)} is invalid for INT4 group {group}: K must be a multiple of it.")
    w64 = w.to(torch.float64)
    g = w64.reshape(*w.shape[:-1], w.shape[-1] // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    if symmetric:
        s = (torch.maximum(-lo, hi) / 8).to(scale_dtype)
        s = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(g / s.to(torch.float64)[..., None]).clamp(-8, 7)
        u, z = (q + 8).to(torch.uint8), None
    else:
        s = ((hi - lo) / 15).to(scale_dtype)
        s = torch.where(s > 0, s, torch.ones_like(s))
        zq = torch.round(-lo / s.to(torch.float64)).clamp(0, 15)  # the unsigned zero point
        u = torch.round(g / s.to(torch.float64)[..., None] + zq[..., None]).clamp(0, 15).to(torch.uint8)
        z = zq.to(torch.uint8)
    return pack_int4(u.flatten(-2)), s.contiguous(), z


def reference_fused_moe_int4(x_TD: torch.Tensor, w13_q_EFW: torch.Tensor, w13_s_EFS: torch.Tensor,
                             w2_q_EDW: torch.Tensor, w2_s_EDS: torch.Tensor, topk_weights_TK: torch.Tensor,
                             topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None, *,
                             w13_z_EFS: torch.Tensor | None = None, w2_z_EDS: torch.Tensor | None = None,
                             b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                             activation: MoEActivation = SILU) -> torch.Tensor:
    """`reference_fused_moe` with INT4 expert weights: dequantize to x's dtype, then the float reference.

    w13 int32 [E, 2I, D/8] ([gate; up] rows) + scales [E, 2I, D/G] (+ zero points uint8, same shape; None: 8), w2
    int32 [E, D, I/8] + [E, D, I/G]. Returns [T, D] in x's dtype; with float64 x this is the exact oracle of the
    Triton kernels."""
    check_int4(w13_q_EFW, w13_s_EFS, w13_z_EFS, "w13")
    check_int4(w2_q_EDW, w2_s_EDS, w2_z_EDS, "w2")
    dt = x_TD.dtype
    w13_EFD = int4_dequantize(w13_q_EFW, w13_s_EFS, w13_z_EFS, dt)
    w2_EDI = int4_dequantize(w2_q_EDW, w2_s_EDS, w2_z_EDS, dt)
    cast = lambda b: None if b is None else b.to(dt)  # noqa: E731
    return reference_fused_moe(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, expert_map_G,
                               b13_EF=cast(b13_EF), b2_ED=cast(b2_ED), activation=activation)
