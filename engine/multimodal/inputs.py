"""The seam between the driver's processor and the rank's vision tower: one request's images and videos, processed.

Legend: P patches (all images, or all videos, in order), C one patch's values in the processor's layout (Qwen-VL:
one dim of channels x temporal x patch x patch; Kimi K2.5: three dims, channels, patch, patch), L prompt tokens.
Pickled to Ray ranks with the request (scheduler NewRequestData.multimodal): tensors and plain values only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class MediaItem(NamedTuple):
    """One image or video of a request: what the rank encodes and where its rows go."""

    video: bool
    grid_thw: tuple[int, int, int]
    hash: bytes
    pixels_PC: torch.Tensor  # its patch rows
    tokens: int  # its placeholder tokens (a video's over all its frames)


def _check(kind: str, pixels_PC: torch.Tensor, grids: tuple, hashes: tuple, pixels: bool) -> None:
    if len(hashes) != len(grids):
        raise ValueError(f"MultimodalInputs: {len(grids)} {kind} grids and {len(hashes)} hashes: one of each per "
                         f"{kind}.")
    patches = sum(t * h * w for t, h, w in grids) if pixels else 0
    if pixels_PC.dim() < 2 or pixels_PC.shape[0] != patches:
        raise ValueError(f"{kind} pixel values have shape {tuple(pixels_PC.shape)}: the grids {list(grids)} need "
                         f"{patches} patch rows.")


@dataclass
class MultimodalInputs:
    """What the rank needs to see a request's images and videos: the processor's pixel patches and grids, a content
    hash per item (the encoder cache's key, and the prefix cache's salt), and, for a model with Qwen's 3-D rotary,
    the prompt's positions with the offset decode continues from (transformers' get_rope_index: its position ids and
    rope delta); None for a model whose tokens turn by their sequence positions (Kimi K2.5). A video's placeholders
    are one run per temporal patch of its grid (the processor writes a timestamp before each)."""

    pixel_values_PC: torch.Tensor  # the images' patches ([0, C] with no image)
    image_grid_thw: tuple[tuple[int, int, int], ...]
    image_hashes: tuple[bytes, ...]
    mrope_3L: torch.Tensor | None  # int64 [3, L]; None: 1-D positions
    mrope_delta: int  # a token at sequence position p >= L turns by p + mrope_delta on all three axes (0 for 1-D)
    image_token_id: int
    spatial_merge_size: int
    # Videos (Qwen3.5's pixel_values_videos and video_grid_thw), placeholders video_token_id.
    pixel_values_videos_PC: torch.Tensor | None = None
    video_grid_thw: tuple[tuple[int, int, int], ...] = ()
    video_hashes: tuple[bytes, ...] = ()
    video_token_id: int = -1
    # False: a decode request of prefill/decode disaggregation sent without its pixels (smg's PD mode: the grids
    # alone), its hashes the prefill engine's (KVTransferParams.mm_hashes). No pixel rows (the tensors hold none):
    # its KV must load, and it computes no placeholder token (the scheduler ends it rather than recompute it:
    # scheduler Request.must_load).
    pixels: bool = True

    def __post_init__(self) -> None:
        if not self.image_grid_thw and not self.video_grid_thw:
            raise ValueError("MultimodalInputs: no image and no video: at least one item.")
        _check("image", self.pixel_values_PC, self.image_grid_thw, self.image_hashes, self.pixels)
        if self.video_grid_thw or self.pixel_values_videos_PC is not None:
            videos_PC = self.pixel_values_videos_PC
            _check("video", videos_PC if videos_PC is not None else torch.zeros(0, 1), self.video_grid_thw,
                   self.video_hashes, self.pixels)
        if self.mrope_3L is not None and (self.mrope_3L.dim() != 2 or self.mrope_3L.shape[0] != 3):
            raise ValueError(f"mrope positions have shape {tuple(self.mrope_3L.shape)}: must be [3, prompt tokens].")

    def items(self, video: bool) -> list[MediaItem]:
        """The images (video False) or the videos, in order."""
        grids, hashes = (self.video_grid_thw, self.video_hashes) if video else (self.image_grid_thw, self.image_hashes)
        pixels_PC = self.pixel_values_videos_PC if video else self.pixel_values_PC
        out, start = [], 0
        for (t, h, w), key in zip(grids, hashes):
            assert pixels_PC is not None
            out.append(MediaItem(video, (t, h, w), key, pixels_PC[start:start + t * h * w],
                                 t * h * w // self.spatial_merge_size ** 2))
            if self.pixels:
                start += t * h * w
        return out

    @property
    def cache_salt(self) -> bytes:
        """The prefix cache's salt (scheduler Request.cache_salt): two prompts with the same placeholder tokens share
        KV only when every image and video behind them is the same."""
        return b"mm:" + b"".join(self.image_hashes) + b"".join(self.video_hashes)


__all__ = ["MediaItem", "MultimodalInputs"]
