"""What the configs of the layer kinds that keep per-sequence state instead of a paged KV cache (Mamba1, Mamba2,
gated DeltaNet) share: as attention kinds, the paged-KV questions answered "nothing"; Mamba's state dtypes. A config
module (engine/config reads it): torch alone. What their modules share: recurrent_state.py."""
from __future__ import annotations

import torch


class NoPagedKV:
    """A state-only kind's answers to the paged-KV questions every attention kind answers: its state sits in the
    state pools (`state_shapes`), so it asks the paged cache for nothing."""

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


def conv_and_ssm_dtypes(dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype]:
    """Mamba's (conv state, SSM state) dtypes: the conv state in the model's dtype, the SSM state in float32 (float64
    for a float64 model): h accumulates over the whole sequence, so it is not held in a 16-bit dtype."""
    return dtype, (torch.float64 if dtype == torch.float64 else torch.float32)


__all__ = ["NoPagedKV", "conv_and_ssm_dtypes"]
