"""DeepSeek's published FP8 weights dequantized as they load, for the families that publish them (DeepSeek-V4's
weights.py, DeepSeek-V4.1's weights.py): a float8_e4m3fn `X.weight` with its `X.scale` beside it (one scale per
block, float8_e8m0fnu or float32) is read into the float tensor moelink holds, e4m3 x a power of two: exact in float32
and float64, one rounding into bf16 (kernels/fp8.block_dequantize).

The loader reads tensors one at a time, file by file: each weight and its scale go into one `Fp8Dequant` (a
moe/weight_plan.Part destination) that writes the float tensor once it holds both. A destination read in part (a TP
rank's rows or columns) reads the scale blocks covering its part, which may start inside a block (`covering`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from moelink.kernels.fp8 import FP8_DTYPE, block_dequantize
from moelink.moe.weight_plan import Part, PlanEntry, WeightPlan

_SCALE_DTYPES = (torch.float32, getattr(torch, "float8_e8m0fnu", torch.float32))


@dataclass
class Fp8Dequant:
    """The float destination of one FP8 checkpoint weight and the parts read so far."""

    dest: torch.Tensor
    name: str
    block: tuple[int, int]
    offset: tuple[int, int] = (0, 0)  # where the weight read starts inside its first scale block (a TP rank's slice)
    parts: dict = field(default_factory=dict)

    def put(self, role: str, src: torch.Tensor, device) -> None:
        """Keep one part; with both, dequantize into the destination (and drop them)."""
        self.parts[role] = src.to(device)
        if len(self.parts) < 2:
            return
        w, s = self.parts.pop("weight"), self.parts.pop("scale")
        if w.dtype != FP8_DTYPE or s.dtype not in _SCALE_DTYPES:
            raise ValueError(f"checkpoint tensor {self.name!r} is not FP8 as DeepSeek publishes it: weight is "
                             f"{w.dtype} (float8_e4m3fn expected) and its scale {s.dtype} (float8_e8m0fnu or "
                             "float32 expected).")
        if tuple(w.shape) != tuple(self.dest.shape):
            raise ValueError(f"checkpoint tensor {self.name!r} has shape {tuple(w.shape)}, expected "
                             f"{tuple(self.dest.shape)} from config.json.")
        # float64 when the model is: an e4m3 value times a power of two is exact there (and in float32)
        wide = torch.promote_types(self.dest.dtype, torch.float32)
        if self.offset == (0, 0):
            self.dest.copy_(block_dequantize(w, s.to(torch.float32), self.block, wide))  # ValueError: bad scale shape
            return
        (bn, bk), (r0, c0), (n, k) = self.block, self.offset, w.shape
        full = s.to(torch.float32).repeat_interleave(bn, 0).repeat_interleave(bk, 1)[r0:r0 + n, c0:c0 + k]
        if tuple(full.shape) != (n, k):
            raise ValueError(f"checkpoint tensor {self.name[:-len('weight')]}scale does not cover the rows / columns "
                             f"of {self.name!r} read (weight_block_size {list(self.block)}).")
        self.dest.copy_((w.to(torch.float32) * full).to(wide))


def fp8_dequant_plan(plan: WeightPlan, names: Iterable[str], block: tuple[int, int],
                     block_of: Callable[[str], tuple[int, int] | None] = lambda name: None) -> WeightPlan:
    """`plan` with every float destination whose `X.weight` has an `X.scale` in `names` read through an Fp8Dequant,
    in blocks of `block_of(name)` where it names one (a family's tensors scaled otherwise), else the file's `block`.
    Destinations of another kind (FP4 bytes, an FP8 linear's float8_e4m3fn weight that reads its scale itself) stay."""
    names = set(names)
    out = dict(plan)
    for name, (dest, idx, source) in plan.items():
        base = name[: -len("weight")]
        if not name.endswith(".weight") or base + "scale" not in names:
            continue
        if not isinstance(dest, torch.Tensor) or not dest.is_floating_point() or dest.dtype == FP8_DTYPE:
            continue
        b = block_of(name) or block
        scale_source, offset = covering(name, source, b)
        target = Fp8Dequant(dest[idx] if idx else dest, name, b, offset)
        out[name] = PlanEntry(Part(target, "weight"), (), source)
        out[base + "scale"] = PlanEntry(Part(target, "scale"), (), scale_source)
    return out


def covering(name: str, source: tuple, block: tuple[int, int]) -> tuple[tuple, tuple[int, int]]:
    """The scale blocks covering the rows / columns `source` reads of a weight (() the whole weight; a TP rank's:
    contiguous slices), and where the read starts inside the first of them."""
    scale, offset = [], [0, 0]
    for dim, part in enumerate(source):
        b = block[dim]
        if not isinstance(part, slice) or part.step not in (None, 1):
            raise ValueError(f"checkpoint tensor {name!r} is FP8 and read through {source!r}: only contiguous slices "
                             "of an FP8 weight are read.")
        if part.start is None and part.stop is None:
            scale.append(slice(None))
            continue
        a = part.start or 0
        scale.append(slice(a // b, None if part.stop is None else -(-part.stop // b)))
        offset[dim] = a - (a // b) * b
    return tuple(scale), (offset[0], offset[1])


__all__ = ["Fp8Dequant", "covering", "fp8_dequant_plan"]
