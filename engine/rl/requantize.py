"""Re-quantizing what a trainer sends in float into the served checkpoint's format (docs/rl.md). The trainer sends each
weight as its float model holds it, under the name and in the shape the float checkpoint has (what the format's
writer quantized); it is quantized here by the same function that writes such checkpoints, and the served tensors
it makes are written through the load plan. The driver does it for a tensor update, each rank for the buckets of a
broadcast it receives (the broadcast carries float; each rank quantizes what it receives).

| format | served tensors | the float tensor sent | quantized by |
| --- | --- | --- | --- |
| FP8 block-scaled (`fp8`) | `X` F8_E4M3 [N, K], `X_scale_inv` | `X` [N, K] | kernels/fp8.block_quantize (`moelink quantize-fp8`) |
| MXFP4 experts (gpt-oss) | `X_blocks` U8 [E, N, K/32, 16], `X_scales` | `X` [E, K, N] (transformers' layout) | kernels/mxfp4.mxfp4_quantize (`moelink quantize-mxfp4`) |
| NVFP4 (ModelOpt) | `B.weight` U8 [N, K/2], `B.weight_scale`, `B.weight_scale_2` | `B.weight` [N, K] | kernels/nvfp4.nvfp4_quantize (`--format nvfp4`) |
| INT4 W4A16 (compressed-tensors) | `B.weight_packed` I32 [N, K/8], `B.weight_scale`, `B.weight_shape` (, `B.weight_zero_point`) | `B.weight` [N, K] | compressed-tensors (quantization_int4.compress_weight, `--format int4`) |
| INT4 GPTQ | `B.qweight` I32 [K/8, N], `B.qzeros`, `B.scales` (`B.g_idx` kept) | `B.weight` [N, K] | RTN per served group, GPTQ's conventions (requantize_gptq_awq.gptq_quantize) |
| INT4 AWQ (GEMM) | `B.qweight` I32 [K, N/8] in AWQ's order, `B.qzeros`, `B.scales` | `B.weight` [N, K] | RTN per served group, AWQ's conventions (requantize_gptq_awq.awq_quantize) |

NVFP4's `input_scale` (a static activation scale, not applied by W4A16) keeps its served value. GPTQ and AWQ are
re-quantized round-to-nearest (no calibration data reaches a rollout engine; requantize_gptq_awq.py says why).
"""
from __future__ import annotations

import torch

from moelink.kernels.fp8 import block_quantize
from moelink.kernels.mxfp4 import mxfp4_quantize
from moelink.kernels.nvfp4 import nvfp4_quantize

from ..config.quantization_int4 import compress_weight
from ..contract.weight_sync import Requant
from .requantize_gptq_awq import awq_quantize, gptq_quantize

_FLOAT = {"F64", "F32", "F16", "BF16"}
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "F8_E4M3": torch.float8_e4m3fn, "U8": torch.uint8, "I8": torch.int8, "I32": torch.int32, "I64": torch.int64}


def requantizable(quantization, served: dict[str, tuple]) -> dict[str, Requant]:
    """{float tensor name: its Requant} for every weight of the served checkpoint (`served`: {name: (safetensors
    dtype, shape)}) that a float tensor may be sent for; empty when the deployment is float or quantized at load."""
    method = getattr(quantization, "method", None)
    if method is None or getattr(quantization, "online", False):
        return {}
    out: dict[str, Requant] = {}
    for name, (dtype, shape) in served.items():
        spec = None
        if method == "fp8" and dtype == "F8_E4M3" and name + "_scale_inv" in served:
            scale = name + "_scale_inv"
            spec = (name, Requant("fp8", tuple(shape), ((name, dtype, tuple(shape)), (scale, *served[scale])),
                                  block=tuple(quantization.block)))
        elif method == "mxfp4" and name.endswith("_blocks") and name[:-7] + "_scales" in served and len(shape) == 4:
            base, (e, n, s, _) = name[:-7], shape
            spec = (base, Requant("mxfp4", (e, s * 32, n), ((name, dtype, tuple(shape)),
                                                           (base + "_scales", *served[base + "_scales"]))))
        elif (method == "nvfp4" and name.endswith(".weight") and dtype == "U8" and len(shape) == 2
              and name[:-6] + "weight_scale_2" in served):
            base = name[:-6]
            spec = (name, Requant("nvfp4", (shape[0], shape[1] * 2), tuple(
                (base + k, *served[base + k]) for k in ("weight", "weight_scale", "weight_scale_2"))))
        elif (method == "int4" and getattr(quantization, "layout", None) == "compressed-tensors"
              and name.endswith(".weight_packed") and name[:-6] + "shape" in served):
            base = name[: -len("weight_packed")]
            parts = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
            spec = (base + "weight", Requant(
                "int4", (shape[0], shape[1] * 8), tuple((base + k, *served[base + k]) for k in parts
                                                        if base + k in served),
                group=quantization.group_size, symmetric=quantization.symmetric))
        elif (method == "int4" and getattr(quantization, "layout", None) in ("gptq", "awq")
              and name.endswith(".qweight") and len(shape) == 2 and name[:-7] + "scales" in served):
            base, layout = name[: -len("qweight")], quantization.layout
            n, k = (shape[1], shape[0] * 8) if layout == "gptq" else (shape[1] * 8, shape[0])
            spec = (base + "weight", Requant(
                layout, (n, k), tuple((base + p, *served[base + p]) for p in ("qweight", "qzeros", "scales")
                                      if base + p in served),
                group=quantization.group_size, symmetric=quantization.symmetric, gptq_v1=quantization.gptq_v1))
        if spec is not None:
            out[spec[0]] = spec[1]
    return out


def requantize(name: str, spec: Requant, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """The float tensor `w` sent as `name` -> {served name: tensor} as the served checkpoint holds them, quantized by
    the format's writer. One ValueError naming the tensor when the format cannot take it."""
    if not w.is_floating_point() or w.dtype == torch.float8_e4m3fn:
        raise ValueError(f"tensor {name!r} is {w.dtype}: {spec.fmt} re-quantizes a float tensor (float64, float32, "
                         "float16, bfloat16).")
    if tuple(w.shape) != spec.shape:
        raise ValueError(f"tensor {name!r} has shape {list(w.shape)}: the served {spec.fmt} weight takes a float "
                         f"tensor of shape {list(spec.shape)}.")
    if not bool(torch.isfinite(w).all()):  # host sync: a quantized format has no encoding for NaN / inf
        raise ValueError(f"tensor {name!r} holds NaN or inf: the served {spec.fmt} weight cannot encode them.")
    try:
        if spec.fmt == "fp8":
            made = dict(zip(spec.names, block_quantize(w, spec.block)))
        elif spec.fmt == "mxfp4":  # transformers' [E, K, N] -> the published [E, N, K] rows, as quantize-mxfp4 does
            made = dict(zip(spec.names, mxfp4_quantize(w.transpose(1, 2))))
        elif spec.fmt == "nvfp4":
            made = dict(zip(spec.names, nvfp4_quantize(w)))
        elif spec.fmt in ("gptq", "awq"):
            base = spec.names[0][: -len("qweight")]
            scale_dtype = _DTYPES[dict((n[len(base):], d) for n, d, _ in spec.outputs)["scales"]]
            made = (gptq_quantize(w, spec.group, spec.symmetric, spec.gptq_v1, scale_dtype) if spec.fmt == "gptq"
                    else awq_quantize(w, spec.group, scale_dtype))
            made = {base + k: v for k, v in made.items() if base + k in spec.names}
        else:
            scale_dtype = _DTYPES[dict((n[n.rindex(".") + 1:], d) for n, d, _ in spec.outputs)["weight_scale"]]
            base = spec.names[0][: -len("weight_packed")]
            made = {base + k: v for k, v in compress_weight(w, spec.symmetric, spec.group, scale_dtype).items()}
    except ValueError as exc:
        raise ValueError(f"tensor {name!r} cannot be quantized into the served {spec.fmt} format: {exc}") from None
    out = {}
    for served, dtype, shape in spec.outputs:
        t = made.get(served)
        if t is None or t.numel() != torch.Size(shape).numel():
            raise ValueError(f"tensor {name!r} quantized gives {served!r} "
                             f"{None if t is None else list(t.shape)}, the served one {list(shape)}.")
        out[served] = t.reshape(shape).to(_DTYPES.get(dtype, t.dtype))
    return out


__all__ = ["requantizable", "requantize"]
