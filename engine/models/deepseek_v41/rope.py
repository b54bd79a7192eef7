"""DeepSeek-V4.1's two ropes (reader.py: "main" for sliding-only layers, "compress" for the rest, the entries and
the indexer), as transformers' main-branch V4.1 applies them: angles position * inv_freq in float32, cos / sin cast to
the activations' dtype, the rope tail's adjacent pairs (2i, 2i + 1) rotated in at least float32 and cast back; the
leading channels pass. Yarn's frequencies come from transformers' own rope functions (attention factor 1).

Legend: P positions, h = rotary_dim / 2.
"""
from __future__ import annotations

import torch
from torch import nn

from ..rope_config import RopeConfig


def inv_freq(rope: RopeConfig, hf_config: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq [h] float32, attention factor) of `rope` ("main" / "compress": rope.layer_type)."""
    R = rope.rotary_dim
    if rope.rope_type == "default":
        return 1.0 / (rope.theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from .reader import text_config_class

    cfg = text_config_class()(**{k: v for k, v in hf_config.items() if k != "model_type"})
    freq, factor = ROPE_INIT_FUNCTIONS[rope.rope_type](cfg, None, layer_type=rope.layer_type)
    return freq.to(torch.float32), float(factor)


class RopeTable(nn.Module):
    """cos / sin float32 [P, h] of one rope."""

    def __init__(self, rope: RopeConfig, hf_config: dict, max_positions: int, device=None):
        super().__init__()
        freq, factor = inv_freq(rope, hf_config)
        angles = torch.arange(max_positions, dtype=torch.float32)[:, None] * freq[None, :]
        self.register_buffer("cos_Ph", (angles.cos() * factor).to(device), persistent=False)
        self.register_buffer("sin_Ph", (angles.sin() * factor).to(device), persistent=False)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """x [T, ..., C] at `positions` [T]: its last 2h channels rotated (by -angle: `inverse`)."""
        cos = self.cos_Ph[positions].to(x.dtype)
        sin = self.sin_Ph[positions].to(x.dtype)
        if inverse:
            sin = -sin
        for _ in range(x.dim() - 2):
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        R = 2 * cos.shape[-1]
        even, odd = x[..., -R::2].float(), x[..., -R + 1::2].float()
        rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)
        return torch.cat([x[..., :-R], rotated.to(x.dtype)], dim=-1)


__all__ = ["RopeTable", "inv_freq"]
