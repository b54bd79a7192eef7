"""NVFP4 expert weights as NVIDIA's ModelOpt publishes them (the FP4 DeepSeek-R1 / Qwen3 releases): the plain-torch
reference, which is also the CPU path and the oracle of the Triton kernels (kernels/triton_moe_nvfp4.py).

Legend: N output channels, K input channels (the GEMM's reduction dim), B = K/2 packed bytes, S = K/16 scale
groups, E local experts, D hidden, I expert intermediate size, F = 2I, T tokens, K* top-k.

Published layout (config.json `quantization_config = {"quant_method": "modelopt", "quant_algo": "NVFP4",
"group_size": 16, "ignore": [...]}`, or the older `hf_quant_config.json` = `{"quantization": {"quant_algo":
"NVFP4", "group_size": 16, "exclude_modules": [...]}}`; engine/config/quantization.py reads both). Per linear
(experts per expert: `mlp.experts.{e}.{gate,up,down}_proj.*`):
- `weight` uint8 [N, K/2]: row n of the [N, K] weight (output-channel major, like nn.Linear), two e2m1 codes per
  byte, the *low* nibble first: byte j holds element 2j in bits 0-3 and element 2j+1 in bits 4-7 (vLLM's
  `break_fp4_bytes` and FlashInfer's test oracle unpack it so: `stack((low, high)).flatten()`); the same code
  table as MXFP4 (kernels/mxfp4.FP4_VALUES: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negations).
- `weight_scale` float8_e4m3fn [N, K/16]: one scale per 16 consecutive values along K (row-major, unswizzled:
  the 128x4 swizzle Blackwell's CUTLASS kernels want is a runtime's load-time choice, not the file's).
- `weight_scale_2` float32 [] (or [1]): the per-tensor "global" scale; the real weight is
  `e2m1(code) * weight_scale[n, k // 16] * weight_scale_2` (ModelOpt: weight_scale_2 = amax(|W|) / (6 * 448),
  so the block scales use e4m3's whole range).
- `input_scale` float32 []: the static activation scale of W4A4 runs. moelink runs W4A16 (activations stay in
  the model dtype, as on Hopper, which has no FP4 tensor cores), so it is loaded and kept but not applied.

In moelink a layer holds w13 [E, 2I, D/2] (gate rows, then up rows, each expert's per-expert tensors copied in)
with scales [E, 2I, D/16] and w2 [E, D, I/2] with [E, D, I/16]. The global scales stay apart, exactly:
`w13_scale2_E2` [E, 2] (gate's and up's weight_scale_2: ModelOpt calibrates them separately, so they may differ;
vLLM keeps only gate's, with a warning) and `w2_scale2_E` [E]. Since the global scale is constant along K, the
kernels apply it to the fp32 accumulator after the K loop: e2m1 x e4m3 has at most 6 significant bits, so a
dequantized tile is exact in bf16/fp16 and the only roundings are the dot's and the accumulator's.
"""
from __future__ import annotations

import torch

from .moe import SILU, MoEActivation, reference_fused_moe
from .mxfp4 import _MIDPOINTS, FP4_MAX, FP4_VALUES

GROUP = 16  # values per e4m3 block scale (ModelOpt's group_size for NVFP4)
SCALE_DTYPE = torch.float8_e4m3fn
E4M3_MAX = 448.0


def check_nvfp4(q: torch.Tensor, scale: torch.Tensor, what: str = "weight") -> None:
    """q uint8 [..., N, K/2] and scale float8_e4m3fn [..., N, K/16], with matching leading dims."""
    if q.dtype != torch.uint8 or scale.dtype != SCALE_DTYPE:
        raise ValueError(f"{what}: packed dtype={q.dtype} / weight_scale dtype={scale.dtype} are invalid: NVFP4 "
                         "packs e2m1 pairs in torch.uint8 with torch.float8_e4m3fn block scales.")
    if (q.dim() < 2 or q.shape[:-1] != scale.shape[:-1] or q.shape[-1] * 2 != scale.shape[-1] * GROUP):
        raise ValueError(f"{what}: packed {tuple(q.shape)} and weight_scale {tuple(scale.shape)} do not fit: need "
                         f"[..., N, K/2] and [..., N, K/{GROUP}].")


def nvfp4_dequantize(q: torch.Tensor, scale: torch.Tensor, scale2: torch.Tensor | float = 1.0,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q uint8 [..., N, K/2] + scale e4m3 [..., N, K/16] (+ scale2, broadcastable to the leading dims [...]) ->
    [..., N, K] in `dtype`. Computed in float64 (exact: 6 significant bits times a float32) when `dtype` is
    float64, else in float32, then one rounding to `dtype`."""
    check_nvfp4(q, scale)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    lut = torch.tensor(FP4_VALUES, dtype=work, device=q.device)
    vals = torch.stack((lut[(q & 0x0F).long()], lut[(q >> 4).long()]), dim=-1).flatten(-2)  # low nibble first
    *lead, n, k = vals.shape
    s = scale.to(work).repeat_interleave(GROUP, dim=-1)
    g = torch.as_tensor(scale2, dtype=work, device=q.device)
    g = g.reshape(()) if g.numel() == 1 else g.reshape(*lead, 1, 1)
    return (vals * s * g).to(dtype)


def nvfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., N, K] (K a multiple of 16) -> (q uint8 [..., N, K/2], scale e4m3 [..., N, K/16], scale2 float32
    [...]), as ModelOpt quantizes a weight: scale2 = amax(|w|) / (6 * 448) per [N, K] matrix, each block's scale
    amax(block) / 6 / scale2 rounded to e4m3, each value w / (scale * scale2) rounded to the nearest e2m1 (ties
    to the even code) and saturated at 6. An all-zero matrix gets scale2 = 1. For tests and tools."""
    if w.dim() < 2 or w.shape[-1] % GROUP:
        raise ValueError(f"w of shape {tuple(w.shape)} is invalid for NVFP4: need [..., N, K] with K a multiple of {GROUP}.")
    if not w.dtype.is_floating_point:
        raise ValueError(f"w.dtype={w.dtype} is invalid: NVFP4 quantizes a floating-point weight.")
    w = w.to(torch.float64)
    if not bool(torch.isfinite(w).all()):  # host sync: a tool-time check
        raise ValueError("w holds NaN or inf: NVFP4 has no encoding for them.")
    *lead, n, k = w.shape
    amax = w.abs().amax(dim=(-2, -1))
    scale2 = torch.where(amax > 0, amax / (FP4_MAX * E4M3_MAX), torch.ones_like(amax)).to(torch.float32)
    g = w.reshape(*lead, n, k // GROUP, GROUP)
    s = (g.abs().amax(dim=-1) / FP4_MAX / scale2.double()[..., None, None]).clamp(max=E4M3_MAX).to(SCALE_DTYPE)
    denom = (s.double() * scale2.double()[..., None, None])[..., None]
    # a block scale that is 0 (an all-zero block, or one that underflows e4m3) encodes zeros
    mag = torch.where(denom > 0, g.abs() / denom.clamp(min=1e-300), torch.zeros_like(g)).clamp(max=FP4_MAX)
    code = torch.zeros_like(mag, dtype=torch.uint8)
    for i, m in enumerate(_MIDPOINTS):  # count the midpoints below |v| (at a tie: up only onto an even code)
        code += (mag >= m if i % 2 else mag > m).to(torch.uint8)
    code |= (g < 0).to(torch.uint8) << 3
    code = code.reshape(*lead, n, k)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous(), s.contiguous(), scale2.contiguous()


def _check_globals(w13_scale2_E2: torch.Tensor, w2_scale2_E: torch.Tensor, E: int) -> None:
    if tuple(w13_scale2_E2.shape) != (E, 2) or tuple(w2_scale2_E.shape) != (E,):
        raise ValueError(f"w13_scale2_E2 {tuple(w13_scale2_E2.shape)} / w2_scale2_E {tuple(w2_scale2_E.shape)} are "
                         f"invalid: need [E, 2] (gate's and up's weight_scale_2) and [E] with E={E}.")


def reference_fused_moe_nvfp4(x_TD: torch.Tensor, w13_q_EFB: torch.Tensor, w13_scale_EFS: torch.Tensor,
                              w13_scale2_E2: torch.Tensor, w2_q_EDB: torch.Tensor, w2_scale_EDS: torch.Tensor,
                              w2_scale2_E: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                              expert_map_G: torch.Tensor | None = None, *, b13_EF: torch.Tensor | None = None,
                              b2_ED: torch.Tensor | None = None, activation: MoEActivation = SILU) -> torch.Tensor:
    """`reference_fused_moe` with NVFP4 expert weights: dequantize to x's dtype (gate rows by their global scale,
    up rows by theirs), then the float reference. w13 [E, 2I, D/2] + [E, 2I, D/16] + [E, 2] with [gate; up] rows,
    w2 [E, D, I/2] + [E, D, I/16] + [E]. Returns [T, D] in x's dtype; with float64 x this is the exact oracle
    of the Triton kernel."""
    check_nvfp4(w13_q_EFB, w13_scale_EFS, "w13")
    check_nvfp4(w2_q_EDB, w2_scale_EDS, "w2")
    E, F = w13_q_EFB.shape[:2]
    _check_globals(w13_scale2_E2, w2_scale2_E, E)
    dt = x_TD.dtype
    g13_EF = w13_scale2_E2.repeat_interleave(F // 2, dim=1)  # [E, F]: gate's for rows < I, up's after
    w13_EFD = nvfp4_dequantize(w13_q_EFB, w13_scale_EFS, 1.0, torch.float64 if dt == torch.float64 else torch.float32)
    w13_EFD = (w13_EFD * g13_EF.to(w13_EFD.dtype)[..., None]).to(dt)
    w2_EDI = nvfp4_dequantize(w2_q_EDB, w2_scale_EDS, w2_scale2_E, dt)
    cast = lambda b: None if b is None else b.to(dt)  # noqa: E731
    return reference_fused_moe(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, expert_map_G,
                               b13_EF=cast(b13_EF), b2_ED=cast(b2_ED), activation=activation)
