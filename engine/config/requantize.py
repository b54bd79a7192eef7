"""Re-quantizing what a trainer sends in float into the served checkpoint's format (docs/rl.md): FP8 block-scaled
weights (`quant_method: fp8`, a `<name>_scale_inv` beside each FP8 `<name>`). The trainer sends the float weight under
the FP8 tensor's name; it is block-quantized exactly as the checkpoint tools quantize (kernels/fp8.block_quantize,
engine/tools/quantize_fp8.py), and the pair (values, scales) written through the load plan. The driver does it for a
tensor update, each rank for the buckets of a broadcast it receives. MXFP4, NVFP4 and INT4 are not re-quantized yet
(refused naming the tensor).
"""
from __future__ import annotations

import torch

from moelink.kernels.fp8 import block_quantize


def fp8_requantizable(quantization, served: dict[str, tuple]) -> dict[str, str]:
    """{FP8 weight name: its scale's name} of the served checkpoint's block-scaled FP8 weights (`served`: {name:
    (safetensors dtype, shape)}); empty when the deployment is not FP8 from an FP8 checkpoint."""
    if getattr(quantization, "method", None) != "fp8" or getattr(quantization, "online", False):
        return {}
    out = {}
    for name, (dtype, _) in served.items():
        scale = name + "_scale_inv"
        if dtype == "F8_E4M3" and scale in served:
            out[name] = scale
    return out


def fp8_pair(name: str, scale_name: str, w: torch.Tensor, block: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The float weight `w` as the served checkpoint holds it: {name: FP8 values, scale_name: float32 scales}."""
    wq, scale_inv = block_quantize(w, block)
    return {name: wq, scale_name: scale_inv}


__all__ = ["fp8_pair", "fp8_requantizable"]
