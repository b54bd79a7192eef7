"""Rotary position embedding (NeoX / Hugging Face `rotate_half` layout).

Legend: T tokens, N query heads, K kv heads, H head dim, P positions.
"""
from __future__ import annotations

import torch


def rotary_cos_sin_cache(head_dim: int, max_positions: int, base: float, device=None) -> torch.Tensor:
    """[P, H] float32 table: cos in the first H/2 columns, sin in the last H/2.

    Built in float32 exactly as the Hugging Face models build it, so float64
    runs see the same (float32-rounded) angles as `transformers`.
    """
    inv_freq_h = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    pos_P = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs_Ph = pos_P[:, None] * inv_freq_h[None, :]
    return torch.cat([freqs_Ph.cos(), freqs_Ph.sin()], dim=-1)


def reference_rotary(
    q_TNH: torch.Tensor, k_TKH: torch.Tensor, positions_T: torch.Tensor, cos_sin_PH: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their token positions; returns new tensors of the inputs' dtype."""
    half = cos_sin_PH.shape[-1] // 2
    cs_TH = cos_sin_PH.index_select(0, positions_T)
    cos_T1H = torch.cat([cs_TH[:, :half], cs_TH[:, :half]], dim=-1).to(q_TNH.dtype)[:, None, :]
    sin_T1H = torch.cat([cs_TH[:, half:], cs_TH[:, half:]], dim=-1).to(q_TNH.dtype)[:, None, :]
    return _rotate(q_TNH, cos_T1H, sin_T1H), _rotate(k_TKH, cos_T1H, sin_T1H)


def _rotate(x_TXH: torch.Tensor, cos_T1H: torch.Tensor, sin_T1H: torch.Tensor) -> torch.Tensor:
    half = x_TXH.shape[-1] // 2
    rot_TXH = torch.cat([-x_TXH[..., half:], x_TXH[..., :half]], dim=-1)
    return x_TXH * cos_T1H + rot_TXH * sin_T1H


def reference_rotary_complex(
    q_TNR: torch.Tensor, k_TKR: torch.Tensor, positions_T: torch.Tensor, table_Ph: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' DeepSeek-V2 apply_rotary_emb: pairs (2i, 2i+1) as complex64, times the token's row of the
    complex64 table [P, R/2] (polar(1, angle) x the rope type's factor), back to the input dtype (float32
    arithmetic even for float64 activations, as there). New tensors; the inputs are not modified."""
    table_T1h = table_Ph.index_select(0, positions_T)[:, None, :]
    return _rotate_complex(q_TNR, table_T1h), _rotate_complex(k_TKR, table_T1h)


def _rotate_complex(x_TXR: torch.Tensor, table_T1h: torch.Tensor) -> torch.Tensor:
    x_TXh2 = x_TXR.float().reshape(*x_TXR.shape[:-1], -1, 2).contiguous()
    out_TXh = torch.view_as_complex(x_TXh2) * table_T1h
    return torch.view_as_real(out_TXh).flatten(-2).to(x_TXR.dtype)
