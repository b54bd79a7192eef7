"""Bytes of one weight matrix in each storage format: the one count the planner (`moelink plan --precision`)
and the engine's start-up report (engine/rank/weight_memory.py) both use.

FP8 block-scaled (kernels/fp8.py's published layout): 1 byte per weight plus one float32 scale per
Bn x Bk block, ragged edges included (ceil). MXFP4 (gpt-oss's experts, kernels/mxfp4.py): two e2m1 values per
byte plus one E8M0 byte per 32 along the reduction dim (cols). Float formats: their element size.
"""
from __future__ import annotations

FP8_BLOCK = (128, 128)
_SCALE_BYTES = 4  # weight_scale_inv is float32
FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
NVFP4_GROUP = 16  # NVFP4: two values per byte, one FP8 scale per 16 along the reduction dim
MXFP4_GROUP = 32  # MXFP4: two values per byte, one E8M0 scale byte per 32 along the reduction dim


def weight_bytes(fmt: str, rows: int, cols: int, block: tuple[int, int] = FP8_BLOCK, float_bytes: int = 2) -> int:
    """Bytes of a [rows, cols] weight held as `fmt`: "fp8" (with its block scales), "float" (float_bytes per
    element), "nvfp4", "mxfp4", or a name of FLOAT_BYTES."""
    if fmt == "fp8":
        return rows * cols + _SCALE_BYTES * (-(-rows // block[0])) * (-(-cols // block[1]))
    if fmt == "nvfp4":
        return rows * cols // 2 + rows * (-(-cols // NVFP4_GROUP))
    if fmt == "mxfp4":
        return rows * cols // 2 + rows * (-(-cols // MXFP4_GROUP))
    if fmt == "float":
        return rows * cols * float_bytes
    if fmt in FLOAT_BYTES:
        return rows * cols * FLOAT_BYTES[fmt]
    raise ValueError(f"weight format {fmt!r} is unknown: choose fp8, nvfp4, mxfp4, float or one of {', '.join(FLOAT_BYTES)}.")


def bytes_per_weight(fmt: str, block: tuple[int, int] = FP8_BLOCK) -> float:
    """Average bytes per weight of large matrices (whole blocks): what the planner multiplies parameter
    counts by."""
    return weight_bytes(fmt, block[0], block[1], block) / (block[0] * block[1])
