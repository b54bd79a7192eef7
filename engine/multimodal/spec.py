"""Which published multimodal checkpoints moelink runs with their images, read from config.json. No torch."""
from __future__ import annotations

import json
from pathlib import Path

# A multimodal wrapper (config.json architectures) -> the attribute of transformers' model that is its vision tower
# (Qwen3_5MoeModel.visual) and where its tensors live in the checkpoint.
VISION_TOWERS = {"Qwen3_5MoeForConditionalGeneration": "model.visual."}


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
    return next((a for a in archs if a in VISION_TOWERS), None)


def published_model_type(model_dir: str) -> str:
    """config.json's own model_type (the wrapper's, "qwen3_5_moe", where the engine reads its text model's)."""
    try:
        return str(json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") or "")
    except (OSError, ValueError):
        return ""


__all__ = ["VISION_TOWERS", "multimodal_architecture", "published_model_type"]
