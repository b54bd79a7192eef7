"""Driver side: the processor's own outputs sent with token ids whose placeholders are already expanded (the Python
API's {"prompt_token_ids": ..., "multi_modal_data": {"image": {...}, "video": {...}}}, and what smg's gRPC
MultimodalInputs carries), checked against the checkpoint and the limits, into one MultimodalInputs.

Images: {"pixel_values": [P, C] float, "image_grid_thw": [N, 3] int}. Videos (Qwen3.5): {"pixel_values_videos":
[P, C] float, "video_grid_thw": [N, 3] int}, as transformers' video processor returns them; the ids hold each
video's frames as the processor writes them, one run of placeholders per temporal patch of its grid (a timestamp
before each). Nothing here preprocesses: the processor (which needs torchvision for video) ran on the caller's side.
The items' hashes are computed here from the pixels, never taken from the caller (a hash sent for other pixels would
share their KV).
"""
from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from .inputs import MultimodalInputs

if TYPE_CHECKING:
    from .processor import ImageProcessor

# Per modality: the processor's pixel key and grid key.
KEYS = {"image": ("pixel_values", "image_grid_thw"), "video": ("pixel_values_videos", "video_grid_thw")}


def item_hashes(pixels_PC: torch.Tensor, grid: tuple[tuple[int, int, int], ...], video: bool = False
                ) -> tuple[bytes, ...]:
    """Per item, sha256 of its grid and its float32 patch values (a video's tagged as one: its placeholders and
    positions are not an image's): the same item processed the same way hashes the same, whatever prompt it is in."""
    out, start = [], 0
    for t, h, w in grid:
        rows = pixels_PC[start:start + t * h * w].contiguous().numpy()
        start += t * h * w
        head = repr(("video", t, h, w) if video else (t, h, w)).encode()
        out.append(hashlib.sha256(head + rows.tobytes()).digest())
    return tuple(out)


def _modality(p: ImageProcessor, kind: str, data: Any, field: str, relayed: bool = False
              ) -> tuple[torch.Tensor | None, tuple, torch.Tensor]:
    """(pixels [P, C] float32, grids, grid tensor [N, 3]) of one modality, checked against the checkpoint (patch
    layout, whole merge windows, images of one frame, each frame within max_pixels) and its limit. `relayed`: a
    decode request whose hashes the prefill engine relayed may come with the grids alone (pixels None)."""
    import numpy as np

    pix_key, grid_key = KEYS[kind]
    keys = ({pix_key, grid_key}, {grid_key}) if relayed else ({pix_key, grid_key},)
    if isinstance(data, dict) and set(data) == {grid_key} and not relayed:
        raise ValueError(f"{field} has {grid_key!r} without {pix_key!r}: only a decode request whose "
                         "kv_transfer_params carry mm_hashes (the prefill engine's, as it returned them) may leave "
                         "the pixels out (docs/multimodal.md).")
    if not isinstance(data, dict) or set(data) not in keys:
        raise ValueError(f"{field} is invalid with token ids: give a dict with exactly {pix_key!r} and {grid_key!r} "
                         "(the processor's outputs)" + (f", or {grid_key!r} alone on a decode request" if relayed
                                                        else "") + ".")
    try:
        pixels_PC = None if pix_key not in data else torch.as_tensor(np.asarray(data[pix_key]) if not isinstance(
            data[pix_key], torch.Tensor) else data[pix_key])
        grid_N3 = torch.as_tensor(data[grid_key])
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{field}: {pix_key} and {grid_key} must be tensors or arrays.") from None
    vc = p.hf.vision_config
    if p.spec.pixels == "flat":
        patch_C: tuple[int, ...] = (int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2,)
    else:  # one RGB patch per row, a Conv2d's input (Kimi K2.5's MoonViT)
        patch_C = (3, int(vc.patch_size), int(vc.patch_size))
    if pixels_PC is not None and (not pixels_PC.is_floating_point() or tuple(pixels_PC.shape[1:]) != patch_C):
        raise ValueError(f"{field}[{pix_key!r}] has shape {tuple(pixels_PC.shape)} and dtype {pixels_PC.dtype}: "
                         f"must be float [patches, {', '.join(map(str, patch_C))}] for this checkpoint.")
    if grid_N3.dim() != 2 or grid_N3.shape[1] != 3 or grid_N3.is_floating_point() or grid_N3.shape[0] < 1:
        raise ValueError(f"{field}[{grid_key!r}] has shape {tuple(grid_N3.shape)}: must be integer [{kind}s, 3] "
                         f"(t, h, w), at least one {kind}.")
    grid = tuple(tuple(int(v) for v in g) for g in grid_N3.tolist())
    limit = p.config.videos if kind == "video" else p.config.images
    if len(grid) > limit:
        raise ValueError(f"{field} has {len(grid)} {kind}s, more than limit_mm_per_prompt[{kind!r}]={limit} "
                         "(--limit-mm-per-prompt).")
    m, patch = p.merge, int(vc.patch_size)
    for i, (t, h, w) in enumerate(grid):
        frames_ok = t >= 1 if kind == "video" else t == 1
        if not frames_ok or h < m or w < m or h % m or w % m or h * w * patch * patch > p.config.max_pixels:
            t_rule = "t (temporal patches) at least 1" if kind == "video" else "t must be 1 (images)"
            raise ValueError(f"{field}[{grid_key!r}][{i}]={[t, h, w]} is invalid: {t_rule}, h and w positive "
                             f"multiples of spatial_merge_size={m}, each frame at most max_pixels="
                             f"{p.config.max_pixels} pixels.")
    need = sum(t * h * w for t, h, w in grid)
    if pixels_PC is None:
        return None, grid, grid_N3.to(torch.long)
    if pixels_PC.shape[0] != need:
        raise ValueError(f"{field}[{pix_key!r}] has {pixels_PC.shape[0]} patch rows: the grids "
                         f"{[list(g) for g in grid]} need {need}.")
    return pixels_PC.to(torch.float32), grid, grid_N3.to(torch.long)


def _runs(ids_L: torch.Tensor, token_id: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of `token_id` in the ids."""
    is_L = (ids_L == token_id).to(torch.int8)
    zero = torch.zeros(1, dtype=torch.int8)
    edges = torch.diff(is_L, prepend=zero, append=zero)
    starts, ends = torch.nonzero(edges == 1).flatten().tolist(), torch.nonzero(edges == -1).flatten().tolist()
    return [(s, e - s) for s, e in zip(starts, ends)]


def _check_runs(p: ImageProcessor, ids_L: torch.Tensor, image_grid: tuple, video_grid: tuple) -> None:
    """Each image is one run of its placeholder tokens, as long as its merged grid; each video one run per temporal
    patch of its grid (what get_rope_index assumes), its runs next to each other (no image between its frames)."""
    m2 = p.merge * p.merge
    image_runs = _runs(ids_L, p.image_token_id)
    want = [t * h * w // m2 for t, h, w in image_grid]
    if [n for _, n in image_runs] != want:
        raise ValueError(f"prompt_token_ids has image placeholder runs (id {p.image_token_id}) of "
                         f"{[n for _, n in image_runs]} tokens: the images need runs of {want}, one per image in "
                         "order.")
    if p.video_token_id is None:
        return
    video_runs = _runs(ids_L, p.video_token_id)
    want = [h * w // m2 for t, h, w in video_grid for _ in range(t)]
    if [n for _, n in video_runs] != want:
        raise ValueError(f"prompt_token_ids has video placeholder runs (id {p.video_token_id}) of "
                         f"{[n for _, n in video_runs]} tokens: the videos' grids {[list(g) for g in video_grid]} "
                         f"need runs of {want}, one per temporal patch (t) of each video, in order.")
    # A video's frames: no image run between its first and its last.
    start = 0
    for i, (t, _, _) in enumerate(video_grid):
        lo, hi = video_runs[start][0], video_runs[start + t - 1][0]
        start += t
        inside = [s for s, _ in image_runs if lo < s < hi]
        if inside:
            raise ValueError(f"prompt_token_ids has an image's placeholders (at {inside[0]}) between the frames of "
                             f"video {i}: a video's runs follow each other.")


def check_preprocessed(p: ImageProcessor, ids: list[int], data: Any,
                       field: str = "prompt['multi_modal_data']",
                       relayed: tuple[str, ...] | None = None) -> MultimodalInputs:
    """The processor's outputs with their token ids (module docstring) as one request's MultimodalInputs.

    `relayed`: a decode request's KVTransferParams.mm_hashes (the prefill engine's hashes of its items, hex), or
    None. With them the request may come with its grids and no pixels (smg's PD mode): its hashes are then those,
    checked in number against the grids, its positions from the ids and grids alone, and it is marked to load its
    KV, never to compute a placeholder (MultimodalInputs.pixels False; docs/multimodal.md)."""
    if not isinstance(data, dict) or not data or set(data) - set(KEYS):
        raise ValueError(f"{field} with prompt_token_ids must be {{'image': {{'pixel_values': ..., "
                         "'image_grid_thw': ...}} and/or {'video': {'pixel_values_videos': ..., 'video_grid_thw': "
                         "...}} (the processor's outputs; docs/multimodal.md).")
    if "video" in data and not p.spec.video:
        raise ValueError(f"{field}['video'] is not supported: this checkpoint's video path is not built "
                         "(docs/multimodal.md).")
    vc = p.hf.vision_config
    pixels_PC = torch.zeros(0, int(vc.in_channels) * int(vc.temporal_patch_size) * int(vc.patch_size) ** 2) \
        if p.spec.pixels == "flat" else torch.zeros(0, 3, int(vc.patch_size), int(vc.patch_size))
    grid: tuple = ()
    grid_N3: torch.Tensor | None = None
    given: dict[str, bool] = {}  # per modality: whether its pixels came
    if "image" in data:
        pix, grid, grid_N3 = _modality(p, "image", data["image"], f"{field}['image']", relayed is not None)
        given["image"] = pix is not None
        pixels_PC = pix if pix is not None else pixels_PC
    videos_PC: torch.Tensor | None = None
    vgrid: tuple = ()
    vgrid_N3: torch.Tensor | None = None
    if "video" in data:
        videos_PC, vgrid, vgrid_N3 = _modality(p, "video", data["video"], f"{field}['video']", relayed is not None)
        given["video"] = videos_PC is not None
    ids_L = torch.tensor(ids, dtype=torch.long)
    _check_runs(p, ids_L, grid, vgrid)
    mrope_3L, delta = p.positions(ids_L[None], grid_N3, vgrid_N3)
    video_token_id = -1 if p.video_token_id is None else p.video_token_id
    if all(given.values()):
        return MultimodalInputs(
            pixels_PC, grid, item_hashes(pixels_PC, grid), mrope_3L, delta, p.image_token_id, p.merge,
            pixel_values_videos_PC=videos_PC, video_grid_thw=vgrid,
            video_hashes=() if videos_PC is None else item_hashes(videos_PC, vgrid, video=True),
            video_token_id=video_token_id)
    assert relayed is not None  # _modality took a grid alone only then
    return _without_pixels(p, ids, field, given, relayed, pixels_PC[:0], grid, vgrid, mrope_3L, delta,
                           video_token_id)


def _without_pixels(p: ImageProcessor, ids: list[int], field: str, given: dict[str, bool], relayed: tuple[str, ...],
                    empty_PC: torch.Tensor, grid: tuple, vgrid: tuple, mrope_3L, delta: int,
                    video_token_id: int) -> MultimodalInputs:
    """A decode request's items as grids without pixels, hashed by the prefill engine (check_preprocessed)."""
    if any(given.values()):
        raise ValueError(f"{field}: some items come with pixels and some without: a decode request sends every "
                         "modality's pixels or none.")
    if len(relayed) != len(grid) + len(vgrid):
        raise ValueError(f"kv_transfer_params.mm_hashes has {len(relayed)} hashes: the request's grids name "
                         f"{len(grid)} images and {len(vgrid)} videos, one hash each (as the prefill engine "
                         "returned them).")
    placeholders = {p.image_token_id} | ({p.video_token_id} if p.video_token_id is not None else set())
    if ids[-1] in placeholders:
        # The decode side computes the last prompt token itself (for its logits): inside an item it needs the
        # item's rows, so the tower and its pixels.
        raise ValueError(f"{field} has no pixels, and the prompt's last token is an image or video placeholder: "
                         "the decode engine computes the last prompt token, which needs its pixels; send them.")
    hashes = tuple(bytes.fromhex(h) for h in relayed)
    return MultimodalInputs(
        empty_PC, grid, hashes[:len(grid)], mrope_3L, delta, p.image_token_id, p.merge,
        pixel_values_videos_PC=empty_PC if vgrid else None, video_grid_thw=vgrid, video_hashes=hashes[len(grid):],
        video_token_id=video_token_id, pixels=False)

__all__ = ["KEYS", "check_preprocessed", "item_hashes"]
