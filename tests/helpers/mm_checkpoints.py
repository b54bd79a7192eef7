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
