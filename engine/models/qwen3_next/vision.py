"""Qwen3.5-MoE's images and videos (engine/multimodal/): the wrapper transformers saves it in, its vision tower
`visual` (transformers' AutoModel of vision_config), Qwen's 3-D rotary positions, the flat pixel rows of Qwen-VL's
processor; the text model is this family's Qwen3_5MoeForCausalLM (config.py's TEXT_MODELS). Imported by computed
name at the first lookup of engine/multimodal/spec.py's VISION_SPECS."""
from __future__ import annotations

from ...multimodal.spec import VISION_SPECS, VisionModule, VisionSpec

VISION_SPECS.add("Qwen3_5MoeForConditionalGeneration", VisionSpec(
    "Qwen3_5MoeModel", (VisionModule("visual", "AutoModel", "vision_config", "model.visual."),),
    positions="mrope", merge_field="spatial_merge_size", pixels="flat", video=True))
