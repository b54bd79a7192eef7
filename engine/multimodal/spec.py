"""Which published multimodal checkpoints moelink runs with their images, and how each family's images reach its text
model (a VisionSpec per wrapper architecture, registered by the family's own package), read from config.json.
No torch."""
from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config.families import FAMILIES, family_module, has_part


@dataclass(frozen=True)
class VisionModule:
    """One submodule of transformers' multimodal model that images go through (a vision tower, a projector): the
    attribute transformers gives it, its class, the config it is built from and where its tensors live."""

    attribute: str  # the name the model's get_image_features reads it by (self.visual, self.vision_tower)
    cls: str  # "AutoModel" (AutoModel.from_config), else a class of the model's own transformers module
    config_field: str  # the sub-config it is built from ("vision_config"); "" for the whole config
    prefix: str  # its tensors in the checkpoint, as transformers' save_pretrained names them

    def __post_init__(self) -> None:
        if not self.attribute or not self.cls or not self.prefix.endswith("."):
            raise ValueError(f"VisionModule({self.attribute!r}, {self.cls!r}, prefix={self.prefix!r}): attribute "
                             "and class are required and the prefix must end in '.'.")


@dataclass(frozen=True)
class VisionSpec:
    """A multimodal family's images, as transformers runs them: its model class (whose own get_image_features
    encodes, called on the submodules alone), the submodules, how the text model's tokens are positioned, and the
    layout of the processor's pixel values."""

    model_class: str  # transformers' base model (Qwen3_5MoeModel, Kimi_K25Model): its get_image_features encodes
    modules: tuple[VisionModule, ...]
    # "mrope": Qwen's 3-D rotary positions from the model's own get_rope_index; "1d": sequence positions (the
    # text model rotates as for text: Kimi K2.5's DeepSeek-V3 MLA).
    positions: str
    merge_field: str  # the vision_config field of the spatial merge (an int, or a square kernel [m, m])
    # The processor's pixel rows: "flat" [patches, channels x temporal x patch^2] (Qwen-VL); "chw" [patches, 3,
    # patch, patch] (Kimi K2.5's MoonViT, a Conv2d patch embedding).
    pixels: str
    # Whether its videos run (the processor's pixel_values_videos / video_grid_thw, encoded by the model class's own
    # get_video_features, placeholders config.video_token_id): Qwen3.5's; Kimi K2.5's video chunks are not built.
    video: bool = False

    def __post_init__(self) -> None:
        if self.positions not in ("mrope", "1d") or self.pixels not in ("flat", "chw") or not self.modules:
            raise ValueError(f"VisionSpec({self.model_class}): positions must be 'mrope' or '1d', pixels 'flat' or "
                             "'chw', at least one module.")


class VisionRegistry(Mapping[str, VisionSpec]):
    """Wrapper architecture -> its VisionSpec, registered by the families: each multimodal family's `vision.py`
    (engine/models/<family>/vision.py, optional) calls `VISION_SPECS.add(...)` for the wrappers it publishes, as its
    kinds.py registers its block kinds. The families' modules are imported by computed name at the first lookup
    (engine/config/families.py's order), so this package names no family and adding one touches no file here."""

    def __init__(self) -> None:
        self._specs: dict[str, VisionSpec] = {}
        self._loaded = False

    def add(self, architecture: str, spec: VisionSpec) -> VisionSpec:
        if not isinstance(spec, VisionSpec):
            raise TypeError(f"{architecture}: a family registers a VisionSpec, not {type(spec).__name__}.")
        if architecture in self._specs:  # two families fighting over one name: never decided by import order
            raise ValueError(f"multimodal architecture {architecture!r} is registered twice.")
        self._specs[architecture] = spec
        return spec

    def _load(self) -> dict[str, VisionSpec]:
        if not self._loaded:
            self._loaded = True
            for family in FAMILIES:
                if has_part(family, "vision"):
                    importlib.import_module(family_module(family, "vision"))
        return self._specs

    def __getitem__(self, architecture: str) -> VisionSpec:
        return self._load()[architecture]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


VISION_SPECS = VisionRegistry()


def multimodal_architecture(model_dir: str) -> str | None:
    """The checkpoint's multimodal architecture moelink runs images for, or None: a text model, a wrapper whose
    images are not built, or a checkpoint saved without its image processor (preprocessor_config.json: nothing
    could turn an image into the model's patches). Such a checkpoint is served as its text model, images refused."""
    try:
        archs = json.loads((Path(model_dir) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    if not (Path(model_dir) / "preprocessor_config.json").is_file():
        return None
    return next((a for a in archs if a in VISION_SPECS), None)


def published_model_type(model_dir: str) -> str:
    """config.json's own model_type (the wrapper's, "qwen3_5_moe", where the engine reads its text model's)."""
    try:
        return str(json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") or "")
    except (OSError, ValueError):
        return ""


__all__ = ["VISION_SPECS", "VisionModule", "VisionRegistry", "VisionSpec", "multimodal_architecture", "published_model_type"]
