"""A rank's per-sequence state pools: the conv and recurrent states of every linear-attention layer
(engine/config/linear_attention.py), indexed by the slots the scheduler hands out (scheduler/hybrid_cache.py).

Slots [0, num_slots) belong to running requests, [num_slots, num_slots + num_checkpoints) hold prefix-cache
checkpoints, the last one is the null slot (padded rows of a captured graph read and write it). A step's copies
run in a fixed order on the device stream, which is what makes the scheduler's reuse of slots safe: copies into
sequence slots (a prefix hit resumes from a checkpoint) before the forward, copies into checkpoint slots (saves)
after it.

Legend: P slots (the null slot included), C conv channels, W' conv kernel - 1, N value heads, K q/k head dim,
V value head dim.
"""
from __future__ import annotations

import torch

from ..config.linear_attention import LinearAttentionConfig


class StateCaches:
    """Per layer (conv_state_PCW', ssm_state_PNKV) for a linear-attention layer, None for any other."""

    def __init__(self, layers: list[LinearAttentionConfig | None], num_slots: int, num_checkpoints: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.num_slots, self.num_checkpoints = num_slots, num_checkpoints
        self.null_slot = num_slots + num_checkpoints
        self.device = device
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for cfg in layers:
            if cfg is None:
                self.layers.append(None)
                continue
            conv_shape, ssm_shape = cfg.state_shapes(self.null_slot)
            self.layers.append((torch.zeros(conv_shape, dtype=dtype, device=device),
                                torch.zeros(ssm_shape, dtype=torch.float32, device=device)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers if pair is not None for t in pair)

    def copy(self, dst_slots: list[int], src_slots: list[int]) -> None:
        """state[dst] = state[src] in every linear layer (one gather and one scatter per tensor)."""
        if not dst_slots:
            return
        dst = torch.tensor(dst_slots, dtype=torch.long).to(self.device, non_blocking=True)
        src = torch.tensor(src_slots, dtype=torch.long).to(self.device, non_blocking=True)
        for pair in self.layers:
            if pair is None:
                continue
            for t in pair:
                t.index_copy_(0, dst, t.index_select(0, src))


__all__ = ["StateCaches"]
