"""Kimi K2.5's images (engine/multimodal/): its MoonViT vision tower and projector, sequence positions (the text
model, DeepSeek-V3's MLA, rotates as for text: config.py's TEXT_MODELS), the processor's [patches, 3, patch, patch]
pixel rows; its video chunks are not built. Imported by computed name at the first lookup of
engine/multimodal/spec.py's VISION_SPECS."""
from __future__ import annotations

from ...multimodal.spec import VISION_SPECS, VisionModule, VisionSpec

# Kimi K2.5 as transformers writes it (save_original_format=False; the published remote-code layout,
# KimiK25ForConditionalGeneration with a fused, rope-permuted wqkv, is served as its text model).
VISION_SPECS.add("Kimi_K25ForConditionalGeneration", VisionSpec(
    "Kimi_K25Model", (VisionModule("vision_tower", "Kimi_K25VisionModel", "vision_config", "model.vision_tower."),
                      VisionModule("mm_projector", "Kimi_K25MultimodalProjection", "", "model.mm_projector.")),
    positions="1d", merge_field="merge_kernel_size", pixels="chw"))
