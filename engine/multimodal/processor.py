"""Driver side: a prompt and its images through the checkpoint's own transformers processor (AutoProcessor from the
checkpoint directory), into token ids and one MultimodalInputs (inputs.py).

Without torchvision (not installable here) transformers cannot build the processor's video half
(Qwen2VLVideoProcessor needs it), so AutoProcessor fails on any Qwen-VL checkpoint; the same processor class is then
built with its image processor's PIL backend (AutoImageProcessor, backend="pil": the slow PIL/numpy path) and no
video processor. Image preprocessing is the processor's, never moelink's.
"""
from __future__ import annotations

import hashlib
import types
from typing import Any

import torch

from ..config.multimodal import MultimodalConfig
from ..contract.safe_text import shown
from .inputs import MultimodalInputs
from .spec import multimodal_architecture


def _images_only_processor(model_dir: str):
    """The checkpoint's processor class without its video processor (module docstring)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import processor_class_from_name
    import json
    from pathlib import Path

    name = json.loads((Path(model_dir) / "processor_config.json").read_text()).get("processor_class")
    base = processor_class_from_name(name) if name else None
    if base is None:
        raise ValueError(f"model={model_dir!r} has no processor_config.json naming its processor_class: its images "
                         "cannot be processed (save the checkpoint's processor beside it).")

    class ImagesOnly(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImagesOnly(image_processor=AutoImageProcessor.from_pretrained(model_dir, backend="pil"),
                      tokenizer=AutoTokenizer.from_pretrained(model_dir), video_processor=None)


def load_processor(model_dir: str):
    """The checkpoint's transformers processor (local files only: no network at run time)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir, local_files_only=True, backend="pil")
    except ImportError:  # torchvision missing: the video processor cannot be built (module docstring)
        return _images_only_processor(model_dir)


class ImageProcessor:
    """A multimodal checkpoint's prompts with images: `process` checks them against the limits, runs the
    processor and computes the 3-D rotary positions with transformers' get_rope_index."""

    def __init__(self, model_dir: str, config: MultimodalConfig):
        from transformers import AutoConfig

        self.config = config
        self.hf = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        self.processor = load_processor(model_dir)
        self.image_token = self.processor.image_token
        self.image_token_id = int(self.hf.image_token_id)
        if self.processor.image_token_id != self.image_token_id:
            raise ValueError(f"model={model_dir!r}: the processor's image token {self.image_token!r} is id "
                             f"{self.processor.image_token_id}, config.json's image_token_id is {self.image_token_id}.")
        self.merge = int(self.hf.vision_config.spatial_merge_size)

    # -- checks -----------------------------------------------------------------------
    def images_of(self, data: Any) -> list:
        """multi_modal_data's images as a list, each checked (type, size), the count within limit_mm_per_prompt."""
        from PIL import Image

        field = "prompt['multi_modal_data']"
        if not isinstance(data, dict):
            raise ValueError(f"{field}={shown(data)} is invalid: must be a dict such as {{'image': <PIL image or "
                             "list of them>}.")
        for key in data:
            if key != "image":
                what = "video input is not built" if key == "video" else "the modalities are 'image'"
                raise ValueError(f"{field}[{shown(key)}] is not supported: {what} (docs/multimodal.md).")
        images = data.get("image")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        limit = self.config.images
        if len(images) > limit:
            raise ValueError(f"{field}['image'] has {len(images)} images, more than limit_mm_per_prompt['image']="
                             f"{limit} (--limit-mm-per-prompt).")
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise ValueError(f"{field}['image'][{i}] of type {type(img).__name__} is invalid: pass a PIL image.")
            w, h = img.size
            if w * h > self.config.max_pixels or w < 1 or h < 1:
                raise ValueError(f"{field}['image'][{i}] is {w}x{h} = {w * h} pixels: allowed at most max_pixels="
                                 f"{self.config.max_pixels}, at least 1x1.")
        return images

    # -- processing ---------------------------------------------------------------------
    def process(self, prompt: Any, data: Any) -> tuple[list[int], MultimodalInputs]:
        """(prompt token ids with the placeholders expanded, the request's MultimodalInputs)."""
        images = self.images_of(data)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt={shown(prompt)} is invalid with multi_modal_data: give the text with one "
                             f"{self.image_token!r} per image (token ids with images are not built: docs/multimodal.md).")
        n = prompt.count(self.image_token)
        if n != len(images):
            raise ValueError(f"prompt has {n} image placeholders ({self.image_token!r}) for {len(images)} images in "
                             "multi_modal_data['image']: give one per image.")
        rgb = [img if img.mode == "RGB" else img.convert("RGB") for img in images]
        try:
            out = self.processor(text=[prompt], images=rgb, return_tensors="pt")
        except (ValueError, TypeError) as e:  # an image the processor cannot take (too thin to resize, ...)
            raise ValueError(f"prompt['multi_modal_data']['image'] was refused by the checkpoint's processor: "
                             f"{shown(str(e))}") from None
        ids_1L = out["input_ids"]
        grid = tuple(tuple(int(v) for v in g) for g in out["image_grid_thw"].tolist())
        pixels_PC = out["pixel_values"]
        hashes = []
        start = 0
        for t, h, w in grid:
            rows = pixels_PC[start:start + t * h * w]
            start += t * h * w
            hashes.append(hashlib.sha256(repr((t, h, w)).encode() + rows.contiguous().numpy().tobytes()).digest())
        mrope_31L, delta_11 = self.rope_index(ids_1L, out["mm_token_type_ids"], out["image_grid_thw"])
        mm = MultimodalInputs(pixels_PC, grid, tuple(hashes), mrope_31L[:, 0].to(torch.int64).contiguous(),
                              int(delta_11.reshape(-1)[0]), self.image_token_id, self.merge)
        return ids_1L[0].tolist(), mm

    def rope_index(self, ids_1L: torch.Tensor, types_1L: torch.Tensor, grid_N3: torch.Tensor):
        """transformers' own get_rope_index (Qwen3_5MoeModel's), called on a stand-in for the model: it reads only
        the config and get_vision_position_ids, which reads nothing of the model."""
        import transformers

        model_cls = getattr(transformers, type(self.hf).__name__.replace("Config", "Model"))
        stand_in = types.SimpleNamespace(config=self.hf)
        stand_in.get_vision_position_ids = types.MethodType(model_cls.get_vision_position_ids, stand_in)
        return model_cls.get_rope_index(stand_in, ids_1L, mm_token_type_ids=types_1L, image_grid_thw=grid_N3)


def make_image_processor(config) -> ImageProcessor | None:
    """The driver's processor for an EngineConfig: None for a text model, images off (limit_mm_per_prompt image 0)
    or random weights (load_format dummy: no tower on the ranks)."""
    if (multimodal_architecture(config.model.model) is None or config.multimodal.images == 0
            or config.load_format == "dummy"):
        return None
    return ImageProcessor(config.model.model, config.multimodal)


__all__ = ["ImageProcessor", "load_processor", "make_image_processor"]
