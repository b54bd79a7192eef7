"""A tiny random Qwen3.5-MoE multimodal checkpoint written by transformers, its processor saved beside it
(tests/engine/test_multimodal_qwen35.py; docs/multimodal.md).

transformers' Qwen3_5MoeForConditionalGeneration on the family's tiny preset (engine/models/qwen3_next/tiny.py),
with the vision tokens added to the tiny tokenizer (ids 400-403, the model's vocabulary 404) and a rotary that
turns all three axes (partial_rotary_factor 1, mrope_section [2, 1, 1] over 8 frequencies: temporal, height and
width each turn some). The processor is transformers' Qwen3VLProcessor with the PIL image processor
(Qwen2VLImageProcessorPil: torchvision is not installable here) at patch 4, merge 2: a 16 x 24 image is 6 tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from moelink.engine.models.qwen3_next.tiny import HF_HYBRID
from moelink.engine.tools.tiny_families import VOCAB, build_hf_model, preset_config, save_model, save_tokenizer

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one image's place in a prompt
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0, "mrope_section": [2, 1, 1]}


def save_mm_checkpoint(out: Path, seed: int = 0) -> str:
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out = Path(out)
    cfg = preset_config(HF_HYBRID["qwen3_5_moe"], vocab_size=VOCAB + len(VISION_TOKENS), rope_parameters=ROPE)
    cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id = range(
        VOCAB, VOCAB + len(VISION_TOKENS))
    save_model(build_hf_model(cfg, seed), out, cfg, torch.float64)
    save_tokenizer(out)  # the tiny tokenizer's own 400 tokens, then the vision tokens after them
    tok = AutoTokenizer.from_pretrained(out)
    tok.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    tok.save_pretrained(out)
    Qwen2VLImageProcessorPil(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8,
                             max_pixels=64 * 64).save_pretrained(out)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen3VLProcessor"}))
    return str(out)


def image(seed: int, h: int = 16, w: int = 24):
    """A random RGB PIL image."""
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8))


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
