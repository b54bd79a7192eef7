"""Driver side: a prompt and its images through the checkpoint's own transformers processor (AutoProcessor from the
checkpoint directory), into token ids and one MultimodalInputs (inputs.py).

Without torchvision (not installable here: PyPI's wheels are CUDA builds that do not import beside torch's CPU
build) transformers cannot build the processor's video half (Qwen2VLVideoProcessor needs it), so AutoProcessor fails
on any Qwen-VL checkpoint; the same processor class is then built with its image processor's PIL backend
(AutoImageProcessor, backend="pil": the slow PIL/numpy path) and no video processor. Kimi K2.5's image processor has
no PIL backend (Kimi_K25ImageProcessor imports torchvision): without torchvision its PIL images are refused naming
the field, and its processor's outputs are taken with token ids (process_preprocessed). Image preprocessing is the
processor's, never moelink's.
"""
from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import torch

from ..config.multimodal import MultimodalConfig
from ..contract.safe_text import shown
from .inputs import MultimodalInputs
from .preprocessed import check_preprocessed, item_hashes
from .spec import VISION_SPECS, multimodal_architecture


def _images_only_processor(model_dir: str):
    """The checkpoint's processor class without its video processor (module docstring)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import processor_class_from_name

    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    # Where AutoProcessor looks: the processor's own file, the image processor's, else the model type's default.
    name = None
    for file in ("processor_config.json", "preprocessor_config.json"):
        path = Path(model_dir) / file
        if path.is_file() and not name:
            name = json.loads(path.read_text()).get("processor_class")
    if not name:
        name = PROCESSOR_MAPPING_NAMES.get(json.loads((Path(model_dir) / "config.json").read_text()).get("model_type"))
    base = processor_class_from_name(name) if name else None
    if base is None:
        raise ValueError(f"model={model_dir!r}: no processor class is named for its images (processor_config.json's "
                         "processor_class): save the checkpoint's processor beside it.")

    class ImagesOnly(base):  # type: ignore[misc, valid-type]
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImagesOnly(image_processor=AutoImageProcessor.from_pretrained(model_dir, backend="pil", local_files_only=True),
                      tokenizer=AutoTokenizer.from_pretrained(model_dir, local_files_only=True), video_processor=None)


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
        arch = multimodal_architecture(model_dir)
        if arch is None:
            raise ValueError(f"model={model_dir!r} takes no images (docs/multimodal.md).")
        self.spec = VISION_SPECS[arch]
        self.image_token_id = int(self.hf.image_token_id)
        # Videos come as the processor's outputs only (preprocessed.py); a family whose video path is not built
        # refuses a limit that would promise them.
        self.video_token_id = int(self.hf.video_token_id) if self.spec.video else None
        if config.videos and not self.spec.video:
            raise ValueError(f"limit_mm_per_prompt['video']={config.videos} is not supported for {arch}: its video "
                             "path is not built (docs/multimodal.md); leave it 0.")
        # Where the processor cannot be built without a package (Kimi K2.5's needs torchvision), PIL images are
        # refused naming it (`process`); the processor's own outputs still come in with token ids.
        self.processor, self.no_processor = None, ""
        try:
            self.processor = load_processor(model_dir)
        except ValueError as e:
            if "torchvision" not in str(e):
                raise
            self.no_processor = (f"the checkpoint's image processor needs torchvision, which is not installed "
                                 f"({type(self.hf).__name__.removesuffix('Config')})")
        if self.processor is not None and self.processor.image_token_id != self.image_token_id:
            raise ValueError(f"model={model_dir!r}: the processor's image token {self.image_token!r} is id "
                             f"{self.processor.image_token_id}, config.json's image_token_id is {self.image_token_id}.")
        merge = getattr(self.hf.vision_config, self.spec.merge_field)
        if isinstance(merge, (list, tuple)):  # a merge kernel [m, m]
            if len(set(merge)) != 1:
                raise ValueError(f"model={model_dir!r}: vision_config.{self.spec.merge_field}={list(merge)} is not "
                                 "square: only a square merge is supported.")
            merge = merge[0]
        self.merge = int(merge)

    @property
    def image_token(self) -> str:
        """The placeholder's text (the processor's; its id where no processor could be built)."""
        return self.processor.image_token if self.processor is not None else f"<id {self.image_token_id}>"

    # -- checks -----------------------------------------------------------------------
    def images_of(self, data: Any) -> list:
        """multi_modal_data's images as a list, each checked (type, size), the count within limit_mm_per_prompt."""
        from PIL import Image

        field = "prompt['multi_modal_data']"
        if not isinstance(data, dict):
            raise ValueError(f"{field}={shown(data)} is invalid: must be a dict such as {{'image': <PIL image or "
                             "list of them>}.")
        for key in data:
            if key == "video":  # frames would go through transformers' video processor
                raise ValueError(f"{field}['video'] with a text prompt is not supported: raw video frames need "
                                 "transformers' video processor, which needs torchvision (not installable here). "
                                 "Send prompt_token_ids with the processor's pixel_values_videos and video_grid_thw "
                                 "(docs/multimodal.md).")
            if key != "image":
                raise ValueError(f"{field}[{shown(key)}] is not supported: the modalities are 'image' and 'video' "
                                 "(docs/multimodal.md).")
        images = data.get("image")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        limit = self.config.images
        if not images:
            raise ValueError(f"{field}['image'] is empty: give at least one image (or leave multi_modal_data out).")
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
        if self.processor is None:
            raise ValueError(f"prompt['multi_modal_data']['image'] as PIL images is not supported here: "
                             f"{self.no_processor}. Send prompt_token_ids with the processor's pixel_values and "
                             "image_grid_thw (docs/multimodal.md).")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompt={shown(prompt)} is invalid with multi_modal_data: give the text with one "
                             f"{self.image_token!r} per image (token ids go with the processor's outputs: docs/multimodal.md).")
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
        if self.video_token_id is not None and bool((ids_1L == self.video_token_id).any()):
            raise ValueError(f"prompt holds video placeholders (id {self.video_token_id}) but no video: a video comes "
                             "as the processor's outputs with prompt_token_ids (docs/multimodal.md).")
        grid = tuple(tuple(int(v) for v in g) for g in out["image_grid_thw"].tolist())
        pixels_PC = out["pixel_values"].to(torch.float32)
        mrope_3L, delta = self.positions(ids_1L, out["image_grid_thw"])
        mm = MultimodalInputs(pixels_PC, grid, item_hashes(pixels_PC, grid), mrope_3L, delta, self.image_token_id,
                              self.merge)
        return ids_1L[0].tolist(), mm

    def process_preprocessed(self, ids: list[int], data: Any, field: str = "prompt['multi_modal_data']",
                             relayed: tuple[str, ...] | None = None) -> MultimodalInputs:
        """Token ids whose placeholders are already expanded, with the processor's own outputs for their images and
        videos (preprocessed.py: what smg's gRPC MultimodalInputs carries); `relayed`, a decode request's item
        hashes from its prefill engine, lets the grids come without pixels (check_preprocessed)."""
        return check_preprocessed(self, ids, data, field, relayed)

    def positions(self, ids_1L: torch.Tensor, grid_N3: torch.Tensor | None, video_grid_N3: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor | None, int]:
        """(the prompt's 3-D rotary positions [3, L], the rope delta decode continues from) for a model with Qwen's
        3-D rotary; (None, 0) for one whose tokens turn by their sequence positions. The token types are the
        processor's (mm_token_type_ids: image 1, video 2). Video timing is not an input here: Qwen3.5 writes each
        frame's timestamp as text in the ids, and its get_rope_index turns each temporal patch as one frame."""
        if self.spec.positions != "mrope":
            return None, 0
        types_1L = (ids_1L == self.image_token_id).to(torch.int64)
        if self.video_token_id is not None:
            types_1L += 2 * (ids_1L == self.video_token_id).to(torch.int64)
        mrope_31L, delta_11 = self.rope_index(ids_1L, types_1L, grid_N3, video_grid_N3)
        return mrope_31L[:, 0].to(torch.int64).contiguous(), int(delta_11.reshape(-1)[0])

    def rope_index(self, ids_1L: torch.Tensor, types_1L: torch.Tensor, grid_N3: torch.Tensor | None,
                   video_grid_N3: torch.Tensor | None = None):
        """transformers' own get_rope_index (Qwen3_5MoeModel's), called on a stand-in for the model: it reads only
        the config and get_vision_position_ids, which reads nothing of the model."""
        import transformers

        model_cls = getattr(transformers, type(self.hf).__name__.replace("Config", "Model"))
        stand_in = types.SimpleNamespace(config=self.hf)
        stand_in.get_vision_position_ids = types.MethodType(model_cls.get_vision_position_ids, stand_in)
        return model_cls.get_rope_index(stand_in, ids_1L, mm_token_type_ids=types_1L, image_grid_thw=grid_N3,
                                        video_grid_thw=None if video_grid_N3 is None else video_grid_N3.clone())


def make_image_processor(config) -> ImageProcessor | None:
    """The driver's processor for an EngineConfig: None for a text model, images and video off
    (limit_mm_per_prompt) or random weights (load_format dummy: no tower on the ranks)."""
    if (multimodal_architecture(config.model.model) is None or not config.multimodal.media_on
            or config.load_format == "dummy"):
        return None
    return ImageProcessor(config.model.model, config.multimodal)


__all__ = ["ImageProcessor", "load_processor", "make_image_processor"]
