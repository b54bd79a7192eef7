"""The gated short convolution as a layer kind (LFM2's and LFM2-MoE's `conv` layers: transformers 5.24's
Lfm2ShortConv / Lfm2MoeShortConv), read from config.json; its module is short_conv.py beside it. Its convolution is
kernels/causal_conv1d.py's (gated DeltaNet's and Mamba2's), without an activation.

A short-conv layer keeps no per-token KV. Each sequence carries one fixed-size state per layer: the last
`conv_kernel - 1` inputs of the causal depthwise convolution, [conv_kernel - 1, hidden_size] in the model's dtype
(kernels/causal_conv1d.py's layout). It sits in the same state pools as linear attention's and Mamba2's
(engine/state/cache.py: declared by `state_shapes`), so the scheduler's slots, prefix-cache checkpoints, preemption
and the KV sizer treat the kind as they treat gated DeltaNet. As an attention kind it answers the paged-KV questions
with "nothing".

Legend: P state slots, R conv kernel - 1, C conv channels (hidden_size).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

# conv_L_cache's bound, checked as config.json is read, before a pool or a weight is sized from it: the published
# value is 3; 64 leaves a wide margin.
MAX_CONV_KERNEL = 1 << 6


@dataclass(frozen=True)
class ShortConvConfig:
    """One short-conv layer's shape (every conv layer of a model has the same). Field names in errors are
    Lfm2MoeConfig's."""

    kind: ClassVar[str] = "short_conv"
    channels: int  # hidden_size: in_proj gives B, C and x of this width each
    conv_kernel: int  # conv_L_cache
    bias: bool = False  # conv_bias: on in_proj, the convolution and out_proj alike

    def __post_init__(self) -> None:
        k = self.conv_kernel
        if isinstance(k, bool) or not isinstance(k, int) or not 2 <= k <= MAX_CONV_KERNEL:
            raise ValueError(f"config.json conv_L_cache={k!r} is invalid: must be an integer in [2, "
                             f"{MAX_CONV_KERNEL}].")
        if isinstance(self.channels, bool) or not isinstance(self.channels, int) or self.channels < 1:
            raise ValueError(f"config.json hidden_size={self.channels!r} is invalid: must be a positive integer.")

    # -- the per-sequence state ------------------------------------------------------------------------------------
    def state_shapes(self, num_slots: int) -> tuple[tuple[int, ...]]:
        """One layer's state pool, the null slot included (the last): (conv_state_PRC,)."""
        return ((num_slots + 1, self.conv_kernel - 1, self.channels),)

    def state_dtypes(self, dtype: torch.dtype) -> tuple[torch.dtype]:
        """The conv state in the model's dtype."""
        return (dtype,)

    def state_bytes_per_sequence(self, dtype: torch.dtype) -> int:
        return self.channels * (self.conv_kernel - 1) * dtype.itemsize

    # -- the paged-KV questions every attention kind answers: none of it ----------------------------------------------
    def kv_values_per_token(self) -> int:
        return 0

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return 0

    def cache_shapes(self, num_blocks: int, block_size: int, cache_dtype: torch.dtype | None = None) -> tuple:
        return ()

    def cache_dtypes(self, cache_dtype: torch.dtype) -> tuple:
        return ()

    def kv_layer_pairs(self, num_layers: int) -> None:
        return None


__all__ = ["MAX_CONV_KERNEL", "ShortConvConfig"]
