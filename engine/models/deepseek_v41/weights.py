"""DeepSeek-V4.1's FP8 files as DeepSeek publishes them (reader.published_format): every float8_e4m3fn `X.weight` with
its `X.scale` beside it (one scale per weight_block_size block, float8_e8m0fnu or float32; the Engram tables' one per
row per 32 values) is dequantized as it loads into the float tensor moelink holds (engine/models/blocks/fp8_dequant.py,
shared with DeepSeek-V4: e4m3 x a power of two, exact in float32 and float64, one rounding into bf16). Nothing runs
FP8 yet: the weights cost their float bytes (the Engram tables, ~98 GB each in FP8, twice that), and the FP4 experts
are not read yet (refused naming expert_dtype).
"""
from __future__ import annotations

from typing import Iterable

from moelink.moe.weight_plan import WeightPlan

from ..blocks.fp8_dequant import fp8_dequant_plan

ENGRAM_BLOCK = (1, 32)  # an Engram table's scales: one per row per 32 values


def _engram_block(name: str) -> tuple[int, int] | None:
    return ENGRAM_BLOCK if ".engram.embed." in name else None


def dequant_plan(plan: WeightPlan, names: Iterable[str], block: tuple[int, int]) -> WeightPlan:
    """`plan` with every float destination whose `X.weight` has an `X.scale` in `names` dequantized as it loads (an
    Engram table's in blocks of ENGRAM_BLOCK, the rest in the file's `block`); the others stay."""
    return fp8_dequant_plan(plan, names, block, _engram_block)


__all__ = ["ENGRAM_BLOCK", "dequant_plan"]
