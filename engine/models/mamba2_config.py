"""Mamba2 as a layer kind (Granite 4.0-H's mamba layers; Bamba's, Nemotron-H's, Falcon-H1's are the same mixer),
read from config.json; its module is mamba2.py beside it, its kernels kernels/mamba2.py.

A Mamba2 layer keeps no per-token KV. Each sequence carries two fixed-size states per layer:
- the short convolution's: the last `conv_kernel - 1` inputs of the causal depthwise convolution over x|B|C,
  [conv_kernel - 1, conv_dim] in the model's dtype (kernels/causal_conv1d.py's layout, shared with gated DeltaNet);
- the SSM's: h of every head, [num_heads, head_dim, state_size], in float32 (float64 for a float64 model: the
  float64 parity tests' oracle keeps its recurrent state in the model's dtype).
They sit in the same state pools as linear attention's (engine/state/cache.py: declared by `state_shapes`), so the
scheduler's slots, prefix-cache checkpoints and the KV sizer treat the kind as they treat gated DeltaNet. As an
attention kind it answers the paged-KV questions with "nothing".

Legend: P state slots, R conv kernel - 1, C conv channels (num_heads * head_dim + 2 * n_groups * state_size),
N heads, H head dim, S state size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .recurrent_state_config import NoPagedKV, conv_and_ssm_dtypes

# The most each size may be, checked as config.json is read, before a state pool or a weight is sized from it: the
# largest published value (Granite 4.0-H-Small: 128 heads of 64, d_state 256 in Bamba-9B, 8 groups in Nemotron-H)
# times a margin of 16 or more.
MAMBA2_BOUNDS = {
    "mamba_n_heads": 1 << 12,
    "mamba_d_head": 1 << 12,
    "mamba_n_groups": 1 << 8,
    "mamba_d_state": 1 << 13,
    "mamba_d_conv": 1 << 6,
}


def _positive_int(name: str, v) -> None:
    most = MAMBA2_BOUNDS[name]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
        raise ValueError(f"config.json {name}={v!r} is invalid: must be an integer in [1, {most}].")


@dataclass(frozen=True)
class Mamba2Config(NoPagedKV):
    """One Mamba2 layer's shape (every mamba layer of a model has the same). The field names in errors are
    GraniteMoeHybridConfig's (mamba_*); another family maps its own onto them."""

    kind: ClassVar[str] = "mamba2"
    # No batched decode graph path yet: the SSM's decode runs the plain-torch reference, which reads host-side
    # lengths (engine/rank/graph_policy.py asks every layer's attention config).
    graphable: ClassVar[bool] = False
    num_heads: int  # mamba_n_heads
    head_dim: int  # mamba_d_head
    n_groups: int  # mamba_n_groups: B and C are shared by num_heads / n_groups heads each
    state_size: int  # mamba_d_state
    conv_kernel: int  # mamba_d_conv
    conv_bias: bool = True  # mamba_conv_bias
    # time_step_limit: dt is clamped to [lo, hi] after softplus(dt + dt_bias).
    dt_min: float = 0.0
    dt_max: float = math.inf
    # The gated RMSNorm after the scan: y * silu(z), then normed over groups of intermediate / n_groups channels
    # (transformers' GraniteMoeHybridRMSNormGated, norm_before_gate=False).
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name, v in (("mamba_n_heads", self.num_heads), ("mamba_d_head", self.head_dim),
                        ("mamba_n_groups", self.n_groups), ("mamba_d_state", self.state_size),
                        ("mamba_d_conv", self.conv_kernel)):
            _positive_int(name, v)
        if self.conv_kernel < 2:
            raise ValueError(f"config.json mamba_d_conv={self.conv_kernel} is invalid: must be >= 2.")
        if self.num_heads % self.n_groups:
            raise ValueError(f"config.json mamba_n_heads={self.num_heads} is invalid: must be a multiple of "
                             f"mamba_n_groups={self.n_groups}.")
        lo, hi = self.dt_min, self.dt_max
        if not (isinstance(lo, float) and isinstance(hi, float) and 0.0 <= lo <= hi and not math.isnan(hi)):
            raise ValueError(f"config.json time_step_limit=[{lo!r}, {hi!r}] is invalid: two numbers 0 <= lo <= hi.")

    # -- shapes ----------------------------------------------------------------------------------------------------
    @property
    def intermediate(self) -> int:
        """x's and z's width: num_heads * head_dim (mamba_expand * hidden_size)."""
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the short convolution: x, B and C concatenated."""
        return self.intermediate + 2 * self.n_groups * self.state_size

    @property
    def in_proj_dim(self) -> int:
        """in_proj's rows: z, x|B|C, dt."""
        return self.intermediate + self.conv_dim + self.num_heads

    def state_shapes(self, num_slots: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One layer's state pools, the null slot included (the last): (conv_state_PRC, ssm_state_PNHS)."""
        return ((num_slots + 1, self.conv_kernel - 1, self.conv_dim),
                (num_slots + 1, self.num_heads, self.head_dim, self.state_size))

    def state_dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """The conv state in the model's dtype, the SSM state in float32 (float64 for a float64 model)."""
        return conv_and_ssm_dtypes(dtype)

    def state_bytes_per_sequence(self, dtype: torch.dtype) -> int:
        """One sequence's state in one layer (state_dtypes)."""
        ssm = self.state_dtypes(dtype)[1].itemsize
        return (self.conv_dim * (self.conv_kernel - 1) * dtype.itemsize
                + self.num_heads * self.head_dim * self.state_size * ssm)


__all__ = ["MAMBA2_BOUNDS", "Mamba2Config"]
