"""Bytes of one weight matrix in each storage format: the one count the planner (`moelink plan --precision`)
and the engine's start-up report (engine/rank/weight_memory.py) both use.

FP8 block-scaled (kernels/fp8.py's published layout): 1 byte per weight plus one float32 scale per
Bn x Bk block, ragged edges included (ceil). MXFP4 (gpt-oss's experts, kernels/mxfp4.py): two e2m1 values per
byte plus one E8M0 byte per 32 along the reduction dim (cols). INT4 (W4A16 experts: Kimi K2 Thinking / K2.5,
GPTQ, AWQ; kernels/int4.py): two values per byte plus one scale per group along the reduction dim in the model
dtype (float_bytes; Kimi: bf16 per 32 values, 0.5625 byte a weight, 0.28x bf16) and, when asymmetric, one uint8 zero
point per group. Float formats: their element size.
"""
from __future__ import annotations

FP8_BLOCK = (128, 128)
_SCALE_BYTES = 4  # weight_scale_inv is float32
FLOAT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
NVFP4_GROUP = 16  # NVFP4: two values per byte, one FP8 scale per 16 along the reduction dim
MXFP4_GROUP = 32  # MXFP4: two values per byte, one E8M0 scale byte per 32 along the reduction dim
INT4_GROUP = 32  # INT4: Kimi K2 Thinking / K2.5's group (GPTQ / AWQ releases: 128)


def weight_bytes(fmt: str, rows: int, cols: int, block: tuple[int, int] = FP8_BLOCK, float_bytes: int = 2,
                 group: int = INT4_GROUP, zero_points: bool = False) -> int:
    """Bytes of a [rows, cols] weight held as `fmt`: "fp8" (with its block scales), "float" (float_bytes per
    element), "nvfp4", "mxfp4", "int4" (group scales of float_bytes each, uint8 zero points with `zero_points`),
    or a name of FLOAT_BYTES."""
    if fmt == "fp8":
        return rows * cols + _SCALE_BYTES * (-(-rows // block[0])) * (-(-cols // block[1]))
    if fmt == "nvfp4":
        return rows * cols // 2 + rows * (-(-cols // NVFP4_GROUP))
    if fmt == "mxfp4":
        return rows * cols // 2 + rows * (-(-cols // MXFP4_GROUP))
    if fmt == "int4":
        groups = rows * (-(-cols // group))
        return rows * cols // 2 + groups * (float_bytes + (1 if zero_points else 0))
    if fmt == "float":
        return rows * cols * float_bytes
    if fmt in FLOAT_BYTES:
        return rows * cols * FLOAT_BYTES[fmt]
    raise ValueError(f"weight format {fmt!r} is unknown: choose fp8, nvfp4, mxfp4, int4, float or one of "
                     f"{', '.join(FLOAT_BYTES)}.")


def bytes_per_weight(fmt: str, block: tuple[int, int] = FP8_BLOCK) -> float:
    """Average bytes per weight of large matrices (whole blocks): what the planner multiplies parameter
    counts by."""
    return weight_bytes(fmt, block[0], block[1], block) / (block[0] * block[1])
