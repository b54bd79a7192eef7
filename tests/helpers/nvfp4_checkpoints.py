"""Tiny Qwen3-MoE and DeepSeek-V3 checkpoints with NVFP4 experts in ModelOpt's published layout (kernels/nvfp4.py),
for tests/engine/test_nvfp4_checkpoint.py (the builder, the presets and the writer live in engine/tools/tiny_families.py
and tiny_formats.py, what `moelink make-tiny-model --format nvfp4` writes).

transformers builds and saves each model (float64); `nvfp4_checkpoint` then rewrites every routed expert's
gate_proj / up_proj / down_proj as ModelOpt exports them (`weight` uint8 [N, K/2], `weight_scale` float8_e4m3fn
[N, K/16], `weight_scale_2` and `input_scale` float32 scalars; gate and up quantized apart, so their global scales
differ) and writes the quantization the way config.json or hf_quant_config.json says it; `dequantized_copy` is the
float64 checkpoint holding exactly the weights the NVFP4 one means (the oracle's). Hidden and expert sizes are
multiples of 16 (one e4m3 scale per 16 values).
"""
from __future__ import annotations

from pathlib import Path

import torch

from moelink.engine.tools.tiny_families import MAX_POS, NVFP4_TINY, VOCAB, save_preset  # noqa: F401
from moelink.engine.tools.tiny_formats import NVFP4_IGNORE as IGNORE  # noqa: F401
from moelink.engine.tools.tiny_formats import nvfp4_checkpoint, rewrite_checkpoint as _rewrite  # noqa: F401


def save_tiny(out: Path, name: str, seed: int = 0) -> str:
    """transformers' own model on NVFP4_TINY[name] (random norms and correction bias), saved float64 with the
    tiny tokenizer."""
    return save_preset(out, NVFP4_TINY[name], seed)


def dequantized_copy(nvfp4_dir: str, out: Path) -> str:
    """The NVFP4 checkpoint with each NVFP4 weight dequantized to float64 (e2m1 x weight_scale x weight_scale_2)
    and its scales dropped; no quantization. transformers loads it as a float model holding exactly the NVFP4
    model's weights."""
    from moelink.kernels.nvfp4 import nvfp4_dequantize

    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if name.endswith(("weight_scale", "weight_scale_2", "input_scale")):
                continue
            base = name[: -len("weight")]
            if base + "weight_scale_2" in ts:
                t = nvfp4_dequantize(t, ts[base + "weight_scale"], ts[base + "weight_scale_2"], torch.float64)
            new[name] = t
        return new

    def config(c: dict) -> dict:
        c.pop("quantization_config", None)
        return c

    return _rewrite(Path(nvfp4_dir), Path(out), tensors, config)
