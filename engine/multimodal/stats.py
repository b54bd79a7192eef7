"""The feature's counters as the engine sums them (engine/core/metrics.py shows them on /metrics): the requests with
images or videos the engine admitted, and what the ranks' vision towers did (scheduler StepStats' encoder fields)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class MultimodalStats:
    requests: int = 0  # requests that carried images or videos
    images: int = 0  # their images
    videos: int = 0  # their videos
    images_encoded: int = 0  # images and videos, by the ranks' vision towers (under TP, once per rank of the group)
    encoder_cache_hits: int = 0
    encoder_s: float = 0.0

    def add_request(self, num_images: int, num_videos: int = 0) -> None:
        self.requests += 1
        self.images += num_images
        self.videos += num_videos

    def add_step(self, stats) -> None:
        """One rank's StepStats (scheduler/outputs.py), or None."""
        if stats is not None and (stats.images_encoded or stats.encoder_cache_hits):
            self.images_encoded += stats.images_encoded
            self.encoder_cache_hits += stats.encoder_cache_hits
            self.encoder_s += stats.encoder_s


__all__ = ["MultimodalStats"]
