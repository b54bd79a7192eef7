"""A tiny random Qwen3.5-MoE multimodal checkpoint written by transformers, its processor saved beside it
(engine/models/qwen3_next/tiny.save_multimodal; tests/engine/test_multimodal_qwen35.py; docs/multimodal.md), and
transformers' greedy tokens on it.

The family's tiny preset with a one-block vision tower at patch 4, merge 2 (a 16 x 24 image is 6 tokens), the
vision tokens added to the tiny tokenizer (ids 400-403, the model's vocabulary 404) and a rotary that turns on all
three axes (partial_rotary_factor 1, mrope_section [2, 1, 1] over 8 frequencies).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moelink.engine.models.qwen3_next.tiny import save_multimodal

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one image's place in a prompt


def save_mm_checkpoint(out: Path, seed: int = 0) -> str:
    return save_multimodal(out, seed)


def image(seed: int, h: int = 16, w: int = 24, binary: bool = False):
    """A random RGB PIL image; `binary`: each channel 0 or 255 (normalised exactly by any preprocessor)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    values = (rng.random((h, w, 3)) < 0.5) * 255 if binary else rng.random((h, w, 3)) * 255
    return Image.fromarray(values.astype(np.uint8))


def hf_mm_greedy(path: str, text: str, images: list, max_new: int) -> list[int]:
    """transformers' Qwen3_5MoeForConditionalGeneration.generate in float64 on the processor's own inputs."""
    import transformers

    from moelink.engine.multimodal.processor import load_processor

    proc = load_processor(path)
    inputs = proc(text=[text], images=images or None, return_tensors="pt")
    model = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
        path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        gen = model.generate(**inputs, do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                             eos_token_id=None, pad_token_id=0)
    return gen[0, inputs["input_ids"].shape[1]:].tolist()


# -- Qwen3.5 video: the processor's outputs past its video processor (which needs torchvision) --------------------
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"  # one video's place in a prompt, as the chat template writes it


class FixedVideoProcessor:
    """Stands in for transformers' Qwen3VLVideoProcessor, which needs torchvision (not installable here): returns
    fixed outputs in its layout for each call's videos (pixel_values_videos [t x h x w, 3 x 2 x patch^2] random
    normalised patches, video_grid_thw, the frames' metadata). The checkpoint's own Qwen3VLProcessor then writes the
    ids around them (a timestamp and a run of placeholders per temporal patch). Random pixels are as good an input as
    any for a random tower."""

    def __init__(self, merge_size: int, temporal_patch_size: int, patch_size: int):
        self.merge_size, self.temporal_patch_size, self.patch_size = merge_size, temporal_patch_size, patch_size
        self.patch_width = 3 * temporal_patch_size * patch_size ** 2

    def __call__(self, videos, **kwargs):
        from transformers.video_utils import VideoMetadata

        pv, grid, meta = [], [], []
        for frames_FHW3 in videos:  # uint8 frames filled with the video's seed (video_inputs)
            frames, h, w = frames_FHW3.shape[0], frames_FHW3.shape[1] // self.patch_size, \
                frames_FHW3.shape[2] // self.patch_size
            t = frames // self.temporal_patch_size
            g = torch.Generator().manual_seed(int(frames_FHW3[0, 0, 0, 0]))
            pv.append(torch.randn(t * h * w, self.patch_width, generator=g))
            grid.append([t, h, w])
            meta.append(VideoMetadata(total_num_frames=frames, fps=2.0, frames_indices=list(range(frames))))
        return {"pixel_values_videos": torch.cat(pv), "video_grid_thw": torch.tensor(grid, dtype=torch.long),
                "video_metadata": meta}


def video_inputs(path: str, text: str, videos: list[tuple[int, int, int, int]], images: list | None = None) -> dict:
    """The checkpoint's processor on `text` with videos of (seed < 256, frames, h patches, w patches) and PIL `images`:
    input_ids, mm_token_type_ids, pixel_values_videos, video_grid_thw (and pixel_values, image_grid_thw)."""
    from moelink.engine.multimodal.processor import load_processor

    proc = load_processor(path)
    ip = proc.image_processor
    proc.video_processor = FixedVideoProcessor(ip.merge_size, ip.temporal_patch_size, ip.patch_size)
    frames = [np.full((n, h * ip.patch_size, w * ip.patch_size, 3), seed, dtype=np.uint8) for seed, n, h, w in videos]
    return dict(proc(text=[text], images=images or None, videos=frames, return_tensors="pt"))


def video_prompt(inputs: dict) -> dict:
    """The Python API's prompt for the processor's outputs (token ids, the video's and the images' tensors)."""
    data = {"video": {k: inputs[k] for k in ("pixel_values_videos", "video_grid_thw")}}
    if "pixel_values" in inputs:
        data["image"] = {k: inputs[k] for k in ("pixel_values", "image_grid_thw")}
    return {"prompt_token_ids": inputs["input_ids"][0].tolist(), "multi_modal_data": data}


def hf_inputs_greedy(path: str, inputs: dict, max_new: int) -> list[int]:
    """transformers' Qwen3_5MoeForConditionalGeneration.generate in float64 on the processor's outputs."""
    import transformers

    model = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
        path, dtype=torch.float64, experts_implementation="eager").eval()
    kw = {k: v.to(torch.float64) if k.startswith("pixel_values") else v for k, v in inputs.items()}
    with torch.no_grad():
        gen = model.generate(**kw, do_sample=False, max_new_tokens=max_new, min_new_tokens=max_new,
                             eos_token_id=None, pad_token_id=0)
    return gen[0, inputs["input_ids"].shape[1]:].tolist()


# -- Kimi K2.5 (engine/models/deepseek/tiny.save_kimi_k25_multimodal) ---------------------------------------------
KIMI_IMAGE = "<|media_begin|><|media_pad|><|media_end|>"  # one image's place in a Kimi K2.5 prompt
KIMI_PATCH = 4


def save_kimi_checkpoint(out: Path, seed: int = 0) -> str:
    from moelink.engine.models.deepseek.tiny import save_kimi_k25_multimodal

    return save_kimi_k25_multimodal(out, seed)


def has_torchvision() -> bool:
    """Whether Kimi K2.5's image processor can be built (Kimi_K25ImageProcessor imports torchvision)."""
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA build beside CPU torch fails at import with RuntimeError
        return False
    return True


def kimi_pixels(seeds_grids: list[tuple[int, int, int]]) -> dict:
    """The processor's outputs for images of (seed, h, w) patch grids, in its layout ([patches, 3, patch, patch]
    float32, grids [N, 3]): random normalised patches, since Kimi_K25ImageProcessor cannot run without torchvision.
    Random pixels are as good an input as any for a random tower."""
    pv, grid = [], []
    for seed, h, w in seeds_grids:
        g = torch.Generator().manual_seed(seed)
        pv.append(torch.randn(h * w, 3, KIMI_PATCH, KIMI_PATCH, generator=g))
        grid.append([1, h, w])
    return {"pixel_values": torch.cat(pv), "image_grid_thw": torch.tensor(grid, dtype=torch.long)}


def kimi_ids(path: str, text: str, grid_N3: torch.Tensor) -> list[int]:
    """`text`'s token ids with each <|media_pad|> repeated for its image's tokens (h x w / 4), as
    Kimi_K25Processor.replace_image_token expands it."""
    from transformers import AutoTokenizer

    pad, parts = "<|media_pad|>", text.split("<|media_pad|>")
    assert len(parts) == len(grid_N3) + 1
    out = parts[0]
    for (_, h, w), rest in zip(grid_N3.tolist(), parts[1:]):
        out += pad * (h * w // 4) + rest
    return AutoTokenizer.from_pretrained(path)(out, add_special_tokens=False)["input_ids"]


def hf_kimi_greedy(path: str, ids: list[int], pixels: dict | None, max_new: int) -> list[int]:
    """transformers' Kimi_K25ForConditionalGeneration.generate in float64."""
    import transformers

    model = transformers.Kimi_K25ForConditionalGeneration.from_pretrained(
        path, dtype=torch.float64, experts_implementation="eager").eval()
    extra = {} if pixels is None else {"pixel_values": pixels["pixel_values"].to(torch.float64),
                                       "image_grid_thw": pixels["image_grid_thw"]}
    with torch.no_grad():
        gen = model.generate(input_ids=torch.tensor([ids]), **extra, do_sample=False, max_new_tokens=max_new,
                             min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
    return gen[0, len(ids):].tolist()
