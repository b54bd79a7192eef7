"""FP8 block-scaled weights and per-token-group activations (W8A8 as DeepSeek-V3/R1, Kimi K2 and Qwen3-FP8 serve
it): the plain-torch reference, which is also the CPU path and the oracle of the Triton kernels.

Legend: T tokens, K input channels (the GEMM's reduction dim), N output channels, E local experts, D hidden,
I expert intermediate size, F = U + I rows of gate and up (U: the first up row, see reference_fused_moe_fp8),
G = ceil(K / group) activation groups per token, Bn / Bk the weight block (128 x 128 in every published
checkpoint).

Published layout (`quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
"weight_block_size": [128, 128]}`): a linear's `weight` is float8_e4m3fn [N, K] and `weight_scale_inv` is
float32 [ceil(N / Bn), ceil(K / Bk)]; the real weight is `weight[n, k] * weight_scale_inv[n // Bn, k // Bk]`
(the name says "inverse" because it is what a quantizer divides by). Ragged edges (N or K not multiples of the
block) keep one scale for the partial block.

Activations are quantized on the fly, per token per `group` (= Bk) consecutive channels, with a float32 scale
each: x[t, k] ≈ xq[t, k] * x_scale[t, k // group]. The GEMM then accumulates in float32:
    out[t, n] = Σ_kb x_scale[t, kb] * w_scale_inv[n // Bn, kb] * Σ_{k in block kb} xq[t, k] * wq[n, k]
which is what `reference_fp8_linear` computes by dequantizing both sides in float32 (same numbers, one matmul).
The fused MoE quantizes its two GEMM inputs the same way (the hidden state before gate/up, the SwiGLU output
before down), as vLLM and SGLang run DeepSeek's experts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .moe import MoEActivation

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# A zero block or token group still gets a finite, nonzero scale (dequantizes to exact zeros).
_MIN_SCALE = 1e-12
DEFAULT_BLOCK = (128, 128)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    if len(block) != 2 or any(int(b) <= 0 for b in block):
        raise ValueError(f"weight_block_size={list(block)!r} is invalid: two positive integers [Bn, Bk] (e.g. [128, 128]).")
    return int(block[0]), int(block[1])


def block_scale_shape(n: int, k: int, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, int]:
    """Shape of `weight_scale_inv` for an [n, k] weight."""
    bn, bk = _check_block(block)
    return (-(-n // bn), -(-k // bk))


def _expand_scales(scale_nk: torch.Tensor, n: int, k: int, bn: int, bk: int) -> torch.Tensor:
    """[..., ceil(n/bn), ceil(k/bk)] block scales → [..., n, k] per element."""
    return scale_nk.repeat_interleave(bn, dim=-2)[..., :n, :].repeat_interleave(bk, dim=-1)[..., :k]


def _div_fp8_max(amax: torch.Tensor) -> torch.Tensor:
    """amax / 448, correctly rounded on every device. A Python-scalar divisor is not: torch's CUDA division by a
    scalar multiplies by its float32 reciprocal, and 1/448 is inexact, so on an H100 60 % of the scales came out
    one ulp off the IEEE quotient that the Triton kernels (tl.div_rn) and the CPU compute, moving fp8 roundings
    (seen 2026-11-22: the GPU reference drifted 1.4 % from the kernel, while the kernel matched float64)."""
    return amax / torch.full_like(amax, FP8_MAX)


def fp8_gemv_rows(widest: int, block: tuple[int, int]) -> int:
    """The rows a program of a fused decode GEMV (kernels/triton_gemv.py) takes over an FP8 weight in `block`
    scale blocks: `widest` (a power of two) narrowed until it divides Bn, so a program's rows share one scale row.
    Under 8 (a Bn with no such divisor) the fused GEMVs do not take the weight."""
    bn = widest
    while bn >= 8 and block[0] % bn:
        bn //= 2
    return bn


def fp8_gemv_fits(widest: int, block: tuple[int, int]) -> bool:
    """Whether the fused decode GEMVs take an FP8 weight in `block` blocks, at most `widest` rows a program: Bk a
    power of two >= 16 (the Triton FP8 kernels' rule: a K tile in one group) and a program's rows in one scale
    row (`fp8_gemv_rows`)."""
    bk = int(block[1])
    return bk >= 16 and bk & (bk - 1) == 0 and fp8_gemv_rows(widest, block) >= 8


def block_quantize(w_NK: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a weight ([..., N, K], leading dims = stacked experts) to float8_e4m3fn with one float32 scale per
    block: scale_inv = amax(|block|) / 448, wq = round(w / scale_inv). Returns (wq [..., N, K], scale_inv
    [..., ceil(N/Bn), ceil(K/Bk)]), the published layout."""
    bn, bk = _check_block(block)
    *lead, n, k = w_NK.shape
    nb, kb = -(-n // bn), -(-k // bk)
    w = w_NK.to(torch.float32)
    padded = F.pad(w, (0, kb * bk - k, 0, nb * bn - n))  # zeros never raise an amax
    blocks = padded.reshape(*lead, nb, bn, kb, bk)
    amax = blocks.abs().amax(dim=(-3, -1))  # [..., nb, kb]
    scale_inv = _div_fp8_max(amax).clamp(min=_MIN_SCALE)
    wq = (w / _expand_scales(scale_inv, n, k, bn, bk)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return wq, scale_inv


def block_dequantize(wq_NK: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """wq * its block's scale_inv, in `dtype` ([..., N, K])."""
    bn, bk = _check_block(block)
    n, k = wq_NK.shape[-2:]
    expected = wq_NK.shape[:-2] + block_scale_shape(n, k, (bn, bk))
    if tuple(scale_inv.shape) != tuple(expected):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {tuple(expected)} for a "
                         f"{tuple(wq_NK.shape)} weight in {bn}x{bk} blocks.")
    w = wq_NK.to(torch.float32) * _expand_scales(scale_inv.to(torch.float32), n, k, bn, bk)
    return w.to(dtype)


def per_token_group_quant(x_TK: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: per token, per `group` consecutive channels, scale = amax / 448.
    Returns (xq float8_e4m3fn [T, K], scale float32 [T, ceil(K / group)])."""
    if group <= 0:
        raise ValueError(f"group={group} is invalid: a positive channel count (the weight's Bk, 128).")
    t, k = x_TK.shape
    g = -(-k // group)
    x = x_TK.to(torch.float32)
    amax = F.pad(x, (0, g * group - k)).reshape(t, g, group).abs().amax(dim=-1)
    scale_TG = _div_fp8_max(amax).clamp(min=_MIN_SCALE)
    xq = (x / scale_TG.repeat_interleave(group, dim=-1)[:, :k]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq, scale_TG


def per_token_group_dequant(xq_TK: torch.Tensor, scale_TG: torch.Tensor, group: int = 128) -> torch.Tensor:
    k = xq_TK.shape[-1]
    return xq_TK.to(torch.float32) * scale_TG.repeat_interleave(group, dim=-1)[:, :k]


def fake_quant_activation(x_TK: torch.Tensor, group: int = 128) -> torch.Tensor:
    """x rounded through the dynamic activation quantizer, in float32: what the W8A8 GEMM sees of x."""
    return per_token_group_dequant(*per_token_group_quant(x_TK, group), group)


def reference_fp8_linear(x_TK: torch.Tensor, wq_NK: torch.Tensor, w_scale_inv: torch.Tensor,
                         block: tuple[int, int] = DEFAULT_BLOCK, bias_N: torch.Tensor | None = None) -> torch.Tensor:
    """W8A8 block-scaled linear: x quantized per token per Bk channels, w dequantized per block, one float32
    matmul; returns [T, N] in x's dtype (float64 inputs compute in float64 after the same roundings, so tests
    compare exactly the quantization effects)."""
    bn, bk = _check_block(block)
    acc = torch.float64 if x_TK.dtype == torch.float64 else torch.float32
    xa = fake_quant_activation(x_TK, bk).to(acc)
    w = block_dequantize(wq_NK, w_scale_inv, (bn, bk), acc)
    out = xa @ w.t()
    if bias_N is not None:
        out = out + bias_N.to(acc)
    return out.to(x_TK.dtype)


def up_row(w13q_EFD: torch.Tensor, w2q_EDI: torch.Tensor) -> int:
    """The first up row U of FP8 experts w13q [E, U + I, D] beside w2q [E, D, I] (reference_fused_moe_fp8)."""
    rows, inter = w13q_EFD.shape[-2], w2q_EDI.shape[-1]
    if rows < 2 * inter:
        raise ValueError(f"w13q_EFD {tuple(w13q_EFD.shape)} is invalid beside w2q_EDI {tuple(w2q_EDI.shape)}: it must "
                         f"hold gate rows [0, I) and up rows [U, U + I) with U >= I = {inter}.")
    return rows - inter


def reference_fused_moe_fp8(x_TD: torch.Tensor, w13q_EFD: torch.Tensor, w13_scale_inv: torch.Tensor,
                            w2q_EDI: torch.Tensor, w2_scale_inv: torch.Tensor, topk_weights_TK: torch.Tensor,
                            topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None,
                            block: tuple[int, int] = DEFAULT_BLOCK, *,
                            activation: MoEActivation | None = None,
                            x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The fused MoE of moelink.kernels.moe.reference_fused_moe with FP8 block-scaled expert weights
    (w13q [E, F, D] with scales [E, ceil(F/Bn), ceil(D/Bk)], w2q [E, D, I] with [E, ceil(D/Bn), ceil(I/Bk)])
    and W8A8 activations: the token's hidden state is group-quantized before gate/up and act(gate, up) before
    down (`activation`: a kernels.moe.MoEActivation, SiLU by default; MiniMax-M3's clamped SwiGLU). Same routing
    semantics (ids -1 and remote experts contribute nothing); [T, D] in x's dtype.

    w13q's rows are gate [0, I), then up [U, U + I) with U = F - I >= I (`up_row`): U = I stacks them as one
    tensor quantized whole (F = 2I); U = ceil(I / Bn) * Bn gives each piece its own blocks when I is not a
    multiple of Bn (rows I..U-1 are unused padding). `activation`: a kernels.moe.MoEActivation in place of
    silu(gate) * up (Hunyuan Hy4's "silu_clamp"); None is SiLU. `x_fp8`: (xq, xs), x already quantized as
    per_token_group_quant(x, Bk) gives it (the norm before the MoE made it: norm.reference_add_rms_norm_fp8), read
    in place of quantizing x here: the same values.

    """
    bn, bk = _check_block(block)
    up = up_row(w13q_EFD, w2q_EDI)
    inter = w2q_EDI.shape[-1]
    acc = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
    num_tokens, top_k = topk_ids_TK.shape
    out_TD = torch.zeros(x_TD.shape, dtype=acc, device=x_TD.device)
    ids_P = topk_ids_TK.reshape(-1).long()
    if expert_map_G is not None:
        ids_P = torch.where(ids_P >= 0, expert_map_G.long()[ids_P.clamp(min=0)], torch.full_like(ids_P, -1))
    weights_P = topk_weights_TK.reshape(-1)
    xa_TD = (fake_quant_activation(x_TD, bk) if x_fp8 is None else per_token_group_dequant(*x_fp8, bk)).to(acc)
    for e in torch.unique(ids_P[ids_P >= 0]).tolist():  # host sync: the loop runs over experts with tokens
        pairs_n = torch.nonzero(ids_P == e).flatten()
        tok_n = pairs_n // top_k
        w13 = block_dequantize(w13q_EFD[e], w13_scale_inv[e], (bn, bk), acc)
        w2 = block_dequantize(w2q_EDI[e], w2_scale_inv[e], (bn, bk), acc)
        h_nF = xa_TD.index_select(0, tok_n) @ w13.t()
        gate_nI, up_nI = h_nF[:, :inter], h_nF[:, up : up + inter]
        act_nI = F.silu(gate_nI) * up_nI if activation is None else activation(gate_nI, up_nI)
        h_nI = fake_quant_activation(act_nI, bk).to(acc)
        y_nD = (h_nI @ w2.t()) * weights_P.index_select(0, pairs_n)[:, None].to(acc)
        out_TD.index_add_(0, tok_n, y_nD)
    return out_TD.to(x_TD.dtype)
