"""Linear attention as a layer kind: gated DeltaNet (Qwen3-Next, Qwen3.5-MoE), read from config.json.

A linear-attention layer keeps no per-token KV. Each sequence carries two fixed-size states per layer:
- the short convolution's: the last `conv_kernel - 1` inputs of the causal depthwise convolution over the
  concatenated q/k/v projections, [conv_kernel - 1, conv_dim] in the model's dtype;
- the recurrent one: S of the gated delta rule, [num_v_heads, head_k_dim, head_v_dim] in float32 (the kernels
  accumulate it in float32 whatever the activations: kernels/gated_delta.py).
The worker keeps them in state pools indexed by slot (engine/state/cache.py), the scheduler hands out the
slots (scheduler/hybrid_cache.py), and the KV sizer counts their bytes per sequence beside the KV blocks' per
token (engine/config/kv_sizing.py). As an attention kind it answers the paged-KV questions with "nothing"
(`kv_bytes_per_token` 0, no `cache_shapes`), so a hybrid model's KV is its full-attention layers' alone.

Legend: C conv channels (2 * key_dim + value_dim), R conv kernel width - 1, P state slots, N value heads, K q/k head dim, V value
head dim.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .recurrent_state_config import NoPagedKV

# How the checkpoint lays out the input projections. "fused" (Qwen3-Next): in_proj_qkvz and in_proj_ba, their rows
# grouped by q/k head ([q, k, v.., z..] per head group, transformers' fix_query_key_value_ordering). "split"
# (Qwen3.5): in_proj_qkv (q rows, then k, then v), in_proj_z, in_proj_b, in_proj_a.
PROJECTION_LAYOUTS = ("fused", "split")
# The output gate's activation on the normed heads: SiLU (Qwen3-Next, Qwen3.5), or sigmoid (Qwen3.8-Flash-Next's
# output_gate_type "sigmoid").
OUTPUT_GATE_ACTS = ("silu", "sigmoid")


# The most each size may be, checked as config.json is read, before a state pool or a weight is sized from it. Each
# bound is the largest published value (Qwen3-Next-80B-A3B: 16 key heads and 32 value heads of 128, a conv kernel of
# 4; Qwen3.5-MoE: up to 64 value heads) times a margin of 16 or more, and far below what a typo or a hostile file asks
# for (linear_value_head_dim 1e6: a recurrent state of 4 x 10^12 bytes per sequence per layer).
LINEAR_BOUNDS = {
    "linear_num_key_heads": 1 << 10,
    "linear_num_value_heads": 1 << 10,
    "linear_key_head_dim": 1 << 12,  # head_dim's own bound (engine/config/model.py)
    "linear_value_head_dim": 1 << 12,
    "linear_conv_kernel_dim": 1 << 6,  # the conv state keeps kernel - 1 rows per sequence and layer
}


def _positive_int(name: str, v) -> None:
    most = LINEAR_BOUNDS[name]
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= most:
        raise ValueError(f"config.json {name}={v!r} is invalid: must be an integer in [1, {most}].")


@dataclass(frozen=True)
class LinearAttentionConfig(NoPagedKV):
    """One gated DeltaNet layer's shape (every linear layer of a model has the same)."""

    kind: ClassVar[str] = "linear"
    num_k_heads: int  # linear_num_key_heads
    num_v_heads: int  # linear_num_value_heads: a multiple of num_k_heads
    head_k_dim: int  # linear_key_head_dim
    head_v_dim: int  # linear_value_head_dim
    conv_kernel: int  # linear_conv_kernel_dim
    projection: str = "fused"
    output_gate_act: str = "silu"  # OUTPUT_GATE_ACTS

    def __post_init__(self) -> None:
        if self.output_gate_act not in OUTPUT_GATE_ACTS:
            raise ValueError(f"config.json output_gate_type={self.output_gate_act!r} is not supported: allowed: "
                             f"{', '.join(map(repr, OUTPUT_GATE_ACTS))}.")
        for name, v in (("linear_num_key_heads", self.num_k_heads), ("linear_num_value_heads", self.num_v_heads),
                        ("linear_key_head_dim", self.head_k_dim), ("linear_value_head_dim", self.head_v_dim)):
            _positive_int(name, v)
        _positive_int("linear_conv_kernel_dim", self.conv_kernel)
        if self.conv_kernel < 2:
            raise ValueError(f"config.json linear_conv_kernel_dim={self.conv_kernel} is invalid: must be >= 2.")
        if self.num_v_heads % self.num_k_heads:
            raise ValueError(f"config.json linear_num_value_heads={self.num_v_heads} is invalid: must be a multiple of "
                             f"linear_num_key_heads={self.num_k_heads}.")
        if self.projection not in PROJECTION_LAYOUTS:
            raise ValueError(f"LinearAttentionConfig projection={self.projection!r} is invalid: allowed: "
                             f"{', '.join(PROJECTION_LAYOUTS)}.")

    # -- shapes ----------------------------------------------------------------------------------------------------
    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        """Channels of the short convolution: q, k and v concatenated."""
        return 2 * self.key_dim + self.value_dim

    def state_shapes(self, num_slots: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """One layer's state pools, the null slot included (the last): (conv_state_PRC, ssm_state_PNKV) with
        R = conv_kernel - 1 rows of the last inputs, oldest first (kernels/causal_conv1d.py's layout)."""
        return ((num_slots + 1, self.conv_kernel - 1, self.conv_dim),
                (num_slots + 1, self.num_v_heads, self.head_k_dim, self.head_v_dim))

    def state_bytes_per_sequence(self, dtype: torch.dtype) -> int:
        """One sequence's state in one layer: the conv state in `dtype`, the recurrent state in float32."""
        return (self.conv_dim * (self.conv_kernel - 1) * dtype.itemsize
                + self.num_v_heads * self.head_k_dim * self.head_v_dim * 4)

    def header_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The shapes of a layer's `linear_attn.*` tensors that the linear_* fields alone decide (as transformers'
        Qwen3NextGatedDeltaNet builds them), each with the fields it checks: engine/config/checkpoint_headers.py
        compares them with the safetensors headers before anything is sized from config.json."""
        f = self.fields()
        return {"norm.weight": ((self.head_v_dim,), f"linear_value_head_dim={self.head_v_dim}"),
                "A_log": ((self.num_v_heads,), f"linear_num_value_heads={self.num_v_heads}"),
                "conv1d.weight": ((self.conv_dim, 1, self.conv_kernel), f)}

    def fields(self) -> str:
        """The linear_* fields as config.json names them, with their values (for an error)."""
        return (f"linear_num_key_heads={self.num_k_heads}, linear_key_head_dim={self.head_k_dim}, "
                f"linear_num_value_heads={self.num_v_heads}, linear_value_head_dim={self.head_v_dim}, "
                f"linear_conv_kernel_dim={self.conv_kernel}")


__all__ = ["LinearAttentionConfig", "PROJECTION_LAYOUTS"]
