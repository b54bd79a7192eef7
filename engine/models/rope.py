"""Rotary position embedding of an attention kind: its table (from transformers' rope init for scaled types)
and the rotation in each pairing style (layer_configs.ROPE_STYLES).

Legend: T tokens, N query heads, K key heads (1 for MLA's shared rope key), H head width, R rotary dims
(a prefix of the head: GLM's partial rotary; MLA passes the rope part alone), h = R/2, P positions.

Numerics follow transformers: inverse frequencies and angles in float32, cos/sin (or the complex exponential)
multiplied by the rope type's attention factor in float32, then applied in the activations' dtype — except
DeepSeek-V2, whose rotation itself runs in complex64 whatever the dtype.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moelink.kernels.rotary import reference_rotary_complex

from ..config.layer_configs import RopeConfig

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


def rope_inv_freq(rope: RopeConfig, hf_config: dict) -> tuple[torch.Tensor, float]:
    """(inv_freq [h] float32, attention_factor). "default" is computed here as every transformers model
    computes it; any other type comes from transformers' own ROPE_INIT_FUNCTIONS on the checkpoint's config
    (yarn's ramp, its `factor`, `mscale` and `original_max_position_embeddings` are the library's business)."""
    R = rope.rotary_dim
    if rope.rope_type == "default":
        return 1.0 / (rope.theta ** (torch.arange(0, R, 2, dtype=torch.float32) / R)), 1.0
    if not hf_config:
        raise ValueError(f"rope_type={rope.rope_type!r} needs the checkpoint's config (ModelConfig.hf_config is empty).")
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = {"layer_type": rope.layer_type} if rope.layer_type is not None else {}  # a per-layer-kind rope (MiMo)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope.rope_type](AutoConfig.for_model(**hf_config), **kw)
    if inv_freq.numel() * 2 != R:
        raise ValueError(f"transformers' {rope.rope_type} rope gives {inv_freq.numel()} frequencies for "
                         f"rotary_dim={R}: the config's head_dim / partial_rotary_factor disagree.")
    return inv_freq.to(torch.float32), float(attention_factor)


def deinterleave_rows(width: int) -> torch.Tensor:
    """Row order [0, 2, 4, ..., 1, 3, 5, ...] of `width` rope rows. Applied to the checkpoint rows that produce
    the rope part (DeepSeek-V3's rope_interleave), it makes the interleaved rotation of pairs (2i, 2i+1) the
    neox rotation of pairs (i, i + h), with the same output transformers returns (its interleaved rope
    de-interleaves too), so the fast rotary kernel runs unchanged."""
    return torch.cat([torch.arange(0, width, 2), torch.arange(1, width, 2)])


class RotaryEmbedding(nn.Module):
    """Rotates the first `rope.rotary_dim` dims of each q and k head by the token's position; the rest pass."""

    def __init__(self, rope: RopeConfig, hf_config: dict, max_positions: int, kernels: Kernels, device=None):
        super().__init__()
        self.rotary_dim, self.style, self.kernels = rope.rotary_dim, rope.style, kernels
        inv_freq_h, factor = rope_inv_freq(rope, hf_config)
        pos_P = torch.arange(max_positions, dtype=torch.float32)
        freqs_Ph = pos_P[:, None] * inv_freq_h[None, :]
        if rope.style == "complex":
            # transformers' DeepSeek-V2: polar(1, angle) * attention_scaling, complex64.
            table = torch.polar(torch.ones_like(freqs_Ph), freqs_Ph) * factor
        else:
            table = torch.cat([freqs_Ph.cos() * factor, freqs_Ph.sin() * factor], dim=-1)
        self.register_buffer("table_PR", table.to(device), persistent=False)

    def forward(self, q_TNH: torch.Tensor, k_TKH: torch.Tensor, positions_T: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """New q and k tensors (contiguous, the inputs' dtype and shapes); the inputs are not modified."""
        R = self.rotary_dim
        q_rot, k_rot = q_TNH[..., :R], k_TKH[..., :R]
        if self.style == "complex":
            q_rot, k_rot = reference_rotary_complex(q_rot, k_rot, positions_T, self.table_PR)
        else:  # "neox", and "interleaved" whose rows were de-interleaved at load (deinterleave_rows)
            q_rot, k_rot = self.kernels.rotary(q_rot, k_rot, positions_T, self.table_PR)
        if R == q_TNH.shape[-1]:
            return q_rot, k_rot
        return torch.cat([q_rot, q_TNH[..., R:]], dim=-1), torch.cat([k_rot, k_TKH[..., R:]], dim=-1)

