"""Rank side: the requests' images and videos held by a model runner, and what each step splices in.

Each image (or video: all its frames at once, the model's get_video_features) of a request is encoded once, by the
first step that computes one of its tokens (through the encoder cache: a preempted request, or another with the same
item, encodes nothing again), and kept while the rank holds the request; a step encodes only the items its own chunk
reaches. A step's rows are the placeholders it computes, wherever its chunk boundaries fall (a chunk may end inside
an image or between a video's frames: the rest of its rows go with the next chunk). Every token of a step that holds
any image request gets 3-D rotary positions where the model has them (Qwen3.5): the processor's for prompt
positions, p + rope delta after the prompt (decode, and output tokens recomputed after a preemption), p on all three
axes for text-only requests; a model with 1-D positions (Kimi K2.5) gets the image rows alone.

Legend: T the step's tokens, M its image and video tokens, D hidden, L a prompt's tokens, K a request's image and
video tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config.model import ModelConfig
from ..config.multimodal import MultimodalConfig
from ..contract.forward_inputs import ImageSplice
from .encoder import EncoderCache, VisionTower
from .inputs import MediaItem, MultimodalInputs
from .spec import VISION_SPECS, multimodal_architecture


@dataclass
class _Held:
    mm: MultimodalInputs
    placeholders_K: np.ndarray  # prompt positions of the image and video tokens, ascending
    items: list[MediaItem]  # its images and videos in prompt order
    starts_I1: np.ndarray  # item i's tokens are placeholders starts_I1[i] .. starts_I1[i + 1] - 1
    embeds_I: list[torch.Tensor | None]  # item i's [N_i, D], encoded at the first step that computes one of them


class ImageRunner:
    """The images of the requests one rank holds (module docstring)."""

    def __init__(self, tower: VisionTower, cache_bytes: int, device: torch.device, mrope: bool = True):
        self.tower, self.device, self.mrope = tower, device, mrope
        self.cache = EncoderCache(cache_bytes)
        self._held: dict[str, _Held] = {}
        self._taken: tuple[int, int, float] = (0, 0, 0.0)

    def add(self, req_id: str, mm: MultimodalInputs, prompt_token_ids: list[int]) -> None:
        """Holds a request's images and videos in prompt order (a video's frames are its placeholder runs, next to
        each other: the driver checked that no other item's run falls between them)."""
        ids_L = np.asarray(prompt_token_ids)
        firsts: list[int] = []
        parts: list[np.ndarray] = []
        items: list[MediaItem] = []
        for video, token_id in ((False, mm.image_token_id), (True, mm.video_token_id)):
            kind_items = mm.items(video)
            pos_K = np.flatnonzero(ids_L == token_id) if kind_items else np.zeros(0, dtype=np.int64)
            want = sum(it.tokens for it in kind_items)
            if len(pos_K) != want:
                what = "video" if video else "image"
                raise ValueError(f"request {req_id!r} has {len(pos_K)} {what} placeholder tokens (id {token_id}) "
                                 f"for {what}s of {want} tokens.")
            for it, item_pos in zip(kind_items, np.split(pos_K, np.cumsum([it.tokens for it in kind_items])[:-1])):
                firsts.append(int(item_pos[0]))
                parts.append(item_pos)
                items.append(it)
        order = sorted(range(len(items)), key=firsts.__getitem__)
        pos_K = np.concatenate([parts[j] for j in order])
        if np.any(np.diff(pos_K) <= 0):
            raise ValueError(f"request {req_id!r}: a video's placeholder runs have another item's between them.")
        counts = [items[j].tokens for j in order]
        self._held[req_id] = _Held(mm, pos_K, [items[j] for j in order], np.cumsum([0] + counts),
                                   [None] * len(counts))

    def drop(self, req_id: str) -> None:
        self._held.pop(req_id, None)

    def clear(self) -> None:
        self._held.clear()

    def holds_images(self) -> bool:
        """Whether any request this rank holds has images (a step of text requests alone plans nothing)."""
        return bool(self._held)

    def take_counts(self) -> tuple[int, int, float]:
        """(images encoded, encoder cache hits, encoder seconds) since the last call (a step's StepStats)."""
        c = self.cache
        now = (c.misses, c.hits, c.encode_s)
        last, self._taken = self._taken, now
        return now[0] - last[0], now[1] - last[1], now[2] - last[2]

    def _rows(self, h: _Held, k0: int, k1: int) -> torch.Tensor:
        """The embeddings of placeholders k0 .. k1 - 1, encoding only the images they fall in (a chunk of a request
        with many images encodes the images its own tokens reach: the tower's work per step follows the step's
        token budget, not the request's image count)."""
        parts = []
        first = int(np.searchsorted(h.starts_I1, k0, side="right")) - 1
        last = int(np.searchsorted(h.starts_I1, k1 - 1, side="right")) - 1
        for i in range(first, last + 1):
            emb_ND = h.embeds_I[i]
            if emb_ND is None:
                it = h.items[i]
                if not h.mm.pixels:  # the scheduler never computes such a request's placeholders (must_load)
                    raise RuntimeError(f"a step computes a placeholder of a request sent without its pixels "
                                       f"(item {i}): it can only load its KV (docs/multimodal.md).")
                emb_ND = h.embeds_I[i] = self.cache.get(it.hash, lambda it=it: self.tower.encode(
                    it.pixels_PC, it.grid_thw, video=it.video))
            lo, hi = max(k0, h.starts_I1[i]) - h.starts_I1[i], min(k1, h.starts_I1[i + 1]) - h.starts_I1[i]
            parts.append(emb_ND[lo:hi])
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def plan(self, seqs: list[tuple[str, int, int]]) -> ImageSplice | None:
        """`seqs`: (request id, tokens computed before this step, tokens this step) in the flat batch's order.
        None when no sequence of the step has images (a text step: untouched), and, for a model with 1-D positions,
        when the step computes no image token (its decode steps are text steps)."""
        if not any(rid in self._held for rid, _, _ in seqs):
            return None
        pos_parts, rows, embeds = [], [], []
        t = 0
        for rid, start, n in seqs:
            p_n = torch.arange(start, start + n, dtype=torch.int64)
            h = self._held.get(rid)
            if h is None or h.mm.mrope_3L is None:
                pos_parts.append(p_n.expand(3, n))
            else:
                L = h.mm.mrope_3L.shape[1]
                seg_3n = (p_n + h.mm.mrope_delta).expand(3, n).clone()
                inside = p_n < L
                if bool(inside.any()):
                    seg_3n[:, inside] = h.mm.mrope_3L[:, p_n[inside]]
                pos_parts.append(seg_3n)
            if h is not None:
                k0, k1 = np.searchsorted(h.placeholders_K, [start, start + n])
                if k1 > k0:
                    rows.append(torch.from_numpy(h.placeholders_K[k0:k1] - start + t))
                    embeds.append(self._rows(h, int(k0), int(k1)))
            t += n
        dev = self.device
        mrope_3T = torch.cat(pos_parts, dim=1).to(dev) if self.mrope else None
        if rows:
            return ImageSplice(torch.cat(rows).to(dev), torch.cat(embeds).to(dev), mrope_3T)
        if mrope_3T is None:
            return None
        return ImageSplice(torch.zeros(0, dtype=torch.int64, device=dev), torch.zeros(0, 0, device=dev), mrope_3T)


def make_image_runner(model_cfg: ModelConfig, config: MultimodalConfig | None, device: torch.device,
                      load_format: str = "auto") -> ImageRunner | None:
    """The rank's images and videos: None for a text model, with images and video off (limit_mm_per_prompt) or random
    weights."""
    arch = multimodal_architecture(model_cfg.model)
    if arch is None or config is None or not config.media_on or load_format == "dummy":
        return None
    return ImageRunner(VisionTower(model_cfg.model, arch, model_cfg.dtype, device), config.encoder_cache_bytes,
                       device, mrope=VISION_SPECS[arch].positions == "mrope")


__all__ = ["ImageRunner", "make_image_runner"]
