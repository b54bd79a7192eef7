"""Mamba1 as a layer kind (Jamba's mamba layers: JambaMambaMixer in transformers 5.24), read from config.json; its
module is mamba1.py beside it, its kernels kernels/mamba1.py.

A Mamba1 layer keeps no per-token KV. Each sequence carries two fixed-size states per layer:
- the short convolution's: the last `conv_kernel - 1` inputs of the causal depthwise convolution over x,
  [conv_kernel - 1, intermediate] in the model's dtype (kernels/causal_conv1d.py's layout, shared with gated
  DeltaNet and Mamba2);
- the SSM's: h of every channel, [intermediate, state_size], in float32 (float64 for a float64 model).
They sit in the same state pools as linear attention's and Mamba2's (engine/state/cache.py: declared by
`state_shapes`), so the scheduler's slots, prefix-cache checkpoints and the KV sizer treat the kind as they treat
Mamba2. As an attention kind it answers the paged-KV questions with "nothing".

Legend: P state slots, R conv kernel - 1, I intermediate (conv channels), K state size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .recurrent_state_config import NoPagedKV, conv_and_ssm_dtypes

# The most each size may be, checked as config.json is read, before a state pool or a weight is sized from it: the
# largest published value (Jamba-1.5-Large: intermediate 16384 = 2 x 8192, dt rank 512, d_state 16, 4 conv taps)
# times a margin of 16 or more.
MAMBA1_BOUNDS = {
    "mamba_intermediate": 1 << 18,
    "mamba_d_state": 1 << 12,
    "mamba_d_conv": 1 << 6,
    "mamba_dt_rank": 1 << 14,
}


def _positive_int(name: str, v) -> None:
    most = MAMBA1_BOUNDS[name]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
        what = "mamba_expand * hidden_size" if name == "mamba_intermediate" else name
        raise ValueError(f"config.json {what}={v!r} is invalid: must be an integer in [1, {most}].")


@dataclass(frozen=True)
class Mamba1Config(NoPagedKV):
    """One Mamba1 layer's shape (every mamba layer of a model has the same). The field names in errors are
    JambaConfig's (mamba_*)."""

    kind: ClassVar[str] = "mamba1"
    # No batched decode graph path yet: the scan's decode runs the plain-torch reference, which reads host-side
    # lengths (engine/rank/graph_policy.py asks every layer's attention config).
    graphable: ClassVar[bool] = False
    intermediate: int  # mamba_expand * hidden_size: x's and z's width, the conv's channels
    state_size: int  # mamba_d_state
    conv_kernel: int  # mamba_d_conv
    dt_rank: int  # mamba_dt_rank ("auto": ceil(hidden_size / 16))
    conv_bias: bool = True  # mamba_conv_bias
    # Jamba's RMSNorms on dt (dt_rank wide), B and C (state_size wide) after x_proj, with their weights
    # (dt_layernorm, b_layernorm, c_layernorm); eps rms_norm_eps.
    inner_norms: bool = True
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name, v in (("mamba_intermediate", self.intermediate), ("mamba_d_state", self.state_size),
                        ("mamba_d_conv", self.conv_kernel), ("mamba_dt_rank", self.dt_rank)):
            _positive_int(name, v)
        if self.conv_kernel < 2:
            raise ValueError(f"config.json mamba_d_conv={self.conv_kernel} is invalid: must be >= 2.")

    # -- shapes ----------------------------------------------------------------------------------------------------
    @property
    def conv_dim(self) -> int:
        """Channels of the short convolution: x alone."""
        return self.intermediate

    @property
    def x_proj_dim(self) -> int:
        """x_proj's rows: dt (dt_rank), B, C."""
        return self.dt_rank + 2 * self.state_size

    def state_shapes(self, num_slots: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One layer's state pools, the null slot included (the last): (conv_state_PRI, ssm_state_PIK)."""
        return ((num_slots + 1, self.conv_kernel - 1, self.intermediate),
                (num_slots + 1, self.intermediate, self.state_size))

    def state_dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
        """The conv state in the model's dtype, the SSM state in float32 (float64 for a float64 model)."""
        return conv_and_ssm_dtypes(dtype)

    def state_bytes_per_sequence(self, dtype: torch.dtype) -> int:
        """One sequence's state in one layer (state_dtypes)."""
        ssm = self.state_dtypes(dtype)[1].itemsize
        return self.intermediate * ((self.conv_kernel - 1) * dtype.itemsize + self.state_size * ssm)


__all__ = ["MAMBA1_BOUNDS", "Mamba1Config"]
