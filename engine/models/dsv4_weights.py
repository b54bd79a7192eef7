"""DeepSeek-V4's FP8 weights as published (engine/config/dsv4_quant.py), dequantized as they load.

V4-Flash / V4-Pro ship attention's linears, the shared expert (and, without `expert_dtype: fp4`, the routed
experts) as float8_e4m3fn `X.weight` with `X.scale` beside it: one scale per weight_block_size block, stored as
float8_e8m0fnu (ue8m0, a power of two) or float32. V4's attention holds plain parameters in the model dtype
(engine/models/dsv4_attention.py runs no FP8 GEMM), so each such weight is dequantized once at load:
e4m3 x its block's scale (kernels/fp8.block_dequantize: exact in float32 and float64, the scales being powers of
two; one rounding into bf16). This costs the model dtype's bytes for those weights (the FP4 experts, nearly all of
V4's bytes, stay packed: moe/expert_weights_dsv4.py).

How: `fp8_dequant_plan` rewrites a weight plan so that each float destination whose checkpoint tensor `X.weight` has
an `X.scale` beside it reads both into one `Fp8Dequant`, which writes the destination when it has both (the loader
reads tensors one at a time, file by file).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, NamedTuple

import torch

from moelink.kernels.fp8 import FP8_DTYPE, block_dequantize
from moelink.moe.weight_plan import PlanEntry, WeightPlan

_PARTS = ("weight", "scale")
_SCALE_DTYPES = (torch.float32, getattr(torch, "float8_e8m0fnu", torch.float32))


@dataclass
class Fp8Dequant:
    """The float destination of one FP8 checkpoint weight and the parts read so far."""

    dest: torch.Tensor
    name: str
    block: tuple[int, int]
    parts: dict = field(default_factory=dict)

    def put(self, role: str, src: torch.Tensor, device) -> None:
        """Keep one part; with both, dequantize into the destination (and drop them)."""
        self.parts[role] = src.to(device)
        if len(self.parts) < len(_PARTS):
            return
        w, s = (self.parts.pop(p) for p in _PARTS)
        if w.dtype != FP8_DTYPE or s.dtype not in _SCALE_DTYPES:
            raise ValueError(f"checkpoint tensor {self.name!r} is not FP8 as DeepSeek-V4 publishes it: weight is "
                             f"{w.dtype} (float8_e4m3fn expected) and its scale {s.dtype} (float8_e8m0fnu or "
                             "float32 expected).")
        if tuple(w.shape) != tuple(self.dest.shape):
            raise ValueError(f"checkpoint tensor {self.name!r} has shape {tuple(w.shape)}, expected "
                             f"{tuple(self.dest.shape)} from config.json.")
        # float64 when the model is: an e4m3 value times a power of two is exact there (and in float32)
        wide = torch.promote_types(self.dest.dtype, torch.float32)
        self.dest.copy_(block_dequantize(w, s.to(torch.float32), self.block, wide))  # ValueError on a bad scale shape


class Fp8Piece(NamedTuple):
    """A plan destination: part `role` of `target` (engine/rank/loader.load_plan calls `put`)."""

    target: Fp8Dequant
    role: str

    def put(self, src: torch.Tensor, device) -> None:
        self.target.put(self.role, src, device)


def fp8_dequant_plan(plan: WeightPlan, names: Iterable[str], block: tuple[int, int]) -> WeightPlan:
    """`plan` with every float destination whose checkpoint weight `X.weight` has an `X.scale` in `names` read
    through an Fp8Dequant (module docstring). Destinations of another kind (the FP4 experts' bytes) stay."""
    names = set(names)
    out = dict(plan)
    for name, (dest, idx, source) in plan.items():
        base = name[: -len("weight")]
        if not name.endswith(".weight") or base + "scale" not in names:
            continue
        if not isinstance(dest, torch.Tensor) or not dest.is_floating_point():
            continue
        if source:
            raise ValueError(f"checkpoint tensor {name!r} is FP8 and read through an index {source!r}: its block "
                             "scales do not follow a row subset.")
        target = Fp8Dequant(dest[idx] if idx else dest, name, block)
        out[name] = PlanEntry(Fp8Piece(target, "weight"))
        out[base + "scale"] = PlanEntry(Fp8Piece(target, "scale"))
    return out


__all__ = ["Fp8Dequant", "Fp8Piece", "fp8_dequant_plan"]
