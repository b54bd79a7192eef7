"""The seam between the driver's processor and the rank's vision tower: one request's images, processed.

Legend: P patches (all images, in order), C one patch's values in the processor's layout (Qwen-VL: one dim of
channels x temporal x patch x patch; Kimi K2.5: three dims, channels, patch, patch), L prompt tokens. Pickled to Ray ranks with the request (scheduler NewRequestData.multimodal): tensors and plain values only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MultimodalInputs:
    """What the rank needs to see a request's images: the processor's pixel patches and grids, a content hash per
    image (the encoder cache's key, and the prefix cache's salt), and, for a model with Qwen's 3-D rotary, the
    prompt's positions with the offset decode continues from (transformers' get_rope_index: its position ids and
    rope delta); None for a model whose tokens turn by their sequence positions (Kimi K2.5)."""

    pixel_values_PC: torch.Tensor
    image_grid_thw: tuple[tuple[int, int, int], ...]
    image_hashes: tuple[bytes, ...]
    mrope_3L: torch.Tensor | None  # int64 [3, L]; None: 1-D positions
    mrope_delta: int  # a token at sequence position p >= L turns by p + mrope_delta on all three axes (0 for 1-D)
    image_token_id: int
    spatial_merge_size: int

    def __post_init__(self) -> None:
        n = len(self.image_grid_thw)
        if not n or len(self.image_hashes) != n:
            raise ValueError(f"MultimodalInputs: {n} image grids and {len(self.image_hashes)} hashes: one of each "
                             "per image, at least one image.")
        patches = sum(t * h * w for t, h, w in self.image_grid_thw)
        if self.pixel_values_PC.dim() < 2 or self.pixel_values_PC.shape[0] != patches:
            raise ValueError(f"pixel_values has shape {tuple(self.pixel_values_PC.shape)}: the grids "
                             f"{list(self.image_grid_thw)} need {patches} patch rows.")
        if self.mrope_3L is not None and (self.mrope_3L.dim() != 2 or self.mrope_3L.shape[0] != 3):
            raise ValueError(f"mrope positions have shape {tuple(self.mrope_3L.shape)}: must be [3, prompt tokens].")

    def image_tokens(self, i: int) -> int:
        """Placeholder tokens of image i (its patches after the spatial merge)."""
        t, h, w = self.image_grid_thw[i]
        return t * h * w // self.spatial_merge_size ** 2

    def patch_rows(self, i: int) -> slice:
        start = sum(t * h * w for t, h, w in self.image_grid_thw[:i])
        t, h, w = self.image_grid_thw[i]
        return slice(start, start + t * h * w)

    @property
    def cache_salt(self) -> bytes:
        """The prefix cache's salt (scheduler Request.cache_salt): two prompts with the same placeholder tokens share
        KV only when every image behind them is the same."""
        return b"mm:" + b"".join(self.image_hashes)


__all__ = ["MultimodalInputs"]
