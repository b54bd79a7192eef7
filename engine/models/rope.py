"""Rotary position embedding of an attention kind: its table (from transformers' rope init for scaled types)
and the rotation in each pairing style (rope_config.ROPE_STYLES).

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

from .rope_config import RopeConfig

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
        if rope.attention_factor is not None:  # the family's own scale (RopeConfig.attention_factor)
            factor = rope.attention_factor
        pos_P = torch.arange(max_positions, dtype=torch.float32)
        freqs_Ph = pos_P[:, None] * inv_freq_h[None, :]
        if rope.style == "complex":
            # transformers' DeepSeek-V2: polar(1, angle) * attention_scaling, complex64.
            table = torch.polar(torch.ones_like(freqs_Ph), freqs_Ph) * factor
        else:
            table = torch.cat([freqs_Ph.cos() * factor, freqs_Ph.sin() * factor], dim=-1)
        self.register_buffer("table_PR", table.to(device), persistent=False)
        self.factor = factor
        self.register_buffer("inv_freq_h", inv_freq_h.to(device), persistent=False)
        # Per frequency, which of the three multimodal positions turns it (RopeConfig.mrope_section): 0 temporal,
        # 1 height, 2 width; None without multimodal rotary.
        comp_h = None
        if rope.mrope_section:
            comp_h = torch.zeros(inv_freq_h.numel(), dtype=torch.long, device=device)
            for dim in (1, 2):
                comp_h[dim:rope.mrope_section[dim] * 3:3] = dim
        self.mrope_h: torch.Tensor | None
        self.register_buffer("mrope_h", comp_h, persistent=False)

    def mrope_table(self, positions_3T: torch.Tensor) -> torch.Tensor:
        """A per-token cos/sin table [T, R] for 3-D positions (a multimodal step): row t is what table_PR's row
        would be if each frequency's angle took its own position component. Read with positions arange(T), the
        rotary kernels rotate by it unchanged (float32 angles and cos/sin, as transformers computes them)."""
        if self.mrope_h is None:
            raise ValueError("3-D rotary positions were given to a rope without mrope_section (RopeConfig).")
        pos_hT = positions_3T.index_select(0, self.mrope_h).to(torch.float32)
        freqs_Th = pos_hT.t() * self.inv_freq_h[None, :]
        return torch.cat([freqs_Th.cos() * self.factor, freqs_Th.sin() * self.factor], dim=-1)

    def positions_and_table(self, positions_T: torch.Tensor, mrope_3T: torch.Tensor | None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, table) for the rotary kernels: the shared table, or with 3-D positions each token's own row."""
        if mrope_3T is None or self.mrope_h is None:
            return positions_T, self.table_PR
        return torch.arange(positions_T.shape[0], device=positions_T.device), self.mrope_table(mrope_3T)

    def forward(self, q_TNH: torch.Tensor, k_TKH: torch.Tensor, positions_T: torch.Tensor,
                table_PR: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """New q and k tensors (contiguous, the inputs' dtype and shapes); the inputs are not modified. `table_PR`:
        another table to read (positions_and_table's per-token one); None: this rope's own."""
        R = self.rotary_dim
        table_PR = self.table_PR if table_PR is None else table_PR
        q_rot, k_rot = q_TNH[..., :R], k_TKH[..., :R]
        if self.style == "complex":
            q_rot, k_rot = reference_rotary_complex(q_rot, k_rot, positions_T, table_PR)
        else:  # "neox", and "interleaved" whose rows were de-interleaved at load (deinterleave_rows)
            q_rot, k_rot = self.kernels.rotary(q_rot, k_rot, positions_T, table_PR)
        if R == q_TNH.shape[-1]:
            return q_rot, k_rot
        return torch.cat([q_rot, q_TNH[..., R:]], dim=-1), torch.cat([k_rot, k_TKH[..., R:]], dim=-1)

