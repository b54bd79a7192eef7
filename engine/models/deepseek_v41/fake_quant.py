"""DeepSeek-V4.1's quantization points as part of the model (quantization-aware training): the values the released
model was trained to see, applied whatever dtype it runs in (transformers' main-branch V4.1 does the same).

- the window KV: FP8 (e4m3) in blocks of 32 channels, each with a power-of-two scale (ue8m0: 2^ceil(log2(amax/448)),
  amax at least 1e-4), the rope tail included;
- a compressed entry: FP4 (e2m1) in blocks of 16 with an e4m3 scale (amax / 6, amax at least 6 * 2^-9);
- an index key and an index query: FP4 in blocks of 32 with a power-of-two scale (2^ceil(log2(amax / 6))).
A vector whose width is not a whole number of blocks passes unquantized (as transformers leaves tiny shapes). The
math runs in float32 (the values are rounded to float32 first) and returns the input's dtype.
"""
from __future__ import annotations

import torch

FP8_MAX, FP4_MAX = 448.0, 6.0
# e2m1 magnitudes, and the midpoints between neighbours: a tie rounds to the even code (the lower magnitude at
# 0.25, 1.25, 2.5 and 5.0; the upper at 0.75, 1.75 and 3.5)
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
TIE_UP = (False, True, False, True, False, True, False)


def pow2_ceil(t: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(t)) of float32 t > 0 (normal numbers: the ue8m0 rounding of a scale)."""
    mantissa, exponent = torch.frexp(t)  # t = mantissa * 2^exponent, mantissa in [0.5, 1)
    return torch.exp2((exponent - (mantissa == 0.5).to(exponent.dtype)).to(torch.float32))


def _blocks(x: torch.Tensor, block: int) -> torch.Tensor | None:
    n = x.shape[-1]
    return None if n % block else x.float().reshape(*x.shape[:-1], n // block, block)


def fp8_block(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """x through FP8 e4m3 with a power-of-two scale per `block` channels, back in x's dtype."""
    b = _blocks(x, block)
    if b is None:
        return x
    scale = pow2_ceil(b.abs().amax(-1).clamp_min(1e-4) * (1.0 / FP8_MAX)).unsqueeze(-1)
    q = (b / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return (q * scale).reshape(x.shape).to(x.dtype)


def _e2m1(q: torch.Tensor) -> torch.Tensor:
    """float32 values in [-6, 6] rounded to the nearest e2m1 value, ties to the even code."""
    mag = q.abs()
    code = torch.zeros_like(mag, dtype=torch.long)
    for mid, up in zip(MIDPOINTS, TIE_UP):
        code += (mag >= mid) if up else (mag > mid)
    values = torch.tensor(E2M1, dtype=torch.float32, device=q.device)[code]
    return torch.where(torch.signbit(q), -values, values)


def fp4_block(x: torch.Tensor, block: int, e4m3_scales: bool = False) -> torch.Tensor:
    """x through FP4 e2m1 per `block` channels with an e4m3 scale (`e4m3_scales`) or a power-of-two one, back in
    x's dtype."""
    b = _blocks(x, block)
    if b is None:
        return x
    amax = b.abs().amax(-1)
    if e4m3_scales:
        scale = (amax.clamp_min(6.0 * 2.0**-9) / FP4_MAX).to(torch.float8_e4m3fn).float()
    else:
        scale = pow2_ceil(amax.clamp_min(6.0 * 2.0**-126) * (1.0 / FP4_MAX))
    scale = scale.unsqueeze(-1)
    return (_e2m1((b / scale).clamp(-FP4_MAX, FP4_MAX)) * scale).reshape(x.shape).to(x.dtype)


__all__ = ["fp4_block", "fp8_block", "pow2_ceil"]
