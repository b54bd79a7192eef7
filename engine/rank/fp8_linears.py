"""FP8 block-scaled checkpoint weights that moelink holds float: dequantized as they load.

An FP8 checkpoint (`quant_method: fp8`, DeepSeek's layout: `X.weight` float8_e4m3fn with `X.weight_scale_inv`, one
float32 scale per weight_block_size block) is served FP8 linear by linear (engine/models/linear.Fp8Linear) wherever
the weight keeps its blocks whole in moelink's layout. Some layouts move rows across blocks at load, which block
scales cannot follow: GLM-5.3-Flash's NoPE MLA rows copied into a zero-padded layout with a rope part, gated
DeltaNet's fused in_proj_qkvz / in_proj_ba rows regrouped per head kind (and a TP rank's three runs of the split
in_proj_qkv), an interleaved-rope de-interleave whose rope part straddles a block. Those linears are built float
(FloatLinear), and so are the ones a checkpoint may quantize beyond what moelink runs in FP8 (KDA's gates): each such
weight is dequantized once here (kernels/fp8.block_dequantize: exact in float32 and float64), then put in its
layout. It costs memory only for those (small) attention projections; the experts and every block-preserving linear
stay FP8.

How: `fp8_linear_plan` rewrites a weight plan so that each float destination whose checkpoint tensor `X.weight`
has an `X.weight_scale_inv` beside it reads both, whole, into one `Fp8Dequant`, which, once it has both,
dequantizes, takes the plan's source (a row order, a TP rank's rows or columns) from the float tensor and writes the
destination (a parameter at its index, or a `Rearranged` one). FP8 destinations (the FP8 linears, the experts) and
online quantization's `QuantizeOnLoad` entries stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from moelink.kernels.fp8 import FP8_DTYPE, block_dequantize
from moelink.moe.weight_plan import Part, PlanEntry, Rearranged, WeightPlan

_PARTS = ("weight", "weight_scale_inv")


@dataclass
class Fp8Dequant:
    """The float destination of one FP8 checkpoint weight and the parts read so far. `dest`: the tensor written (a
    parameter at the plan's index: what a rollback saves, engine/rl/rank/rollback.py); `rearranged`: the plan's
    Rearranged destination, when it has one (it writes `dest` after its own rearrangement); `source`: what of the
    dequantized tensor the plan reads (() = all)."""

    dest: torch.Tensor
    rearranged: Rearranged | None
    source: tuple
    name: str
    block: tuple[int, int]
    parts: dict = field(default_factory=dict)

    def put(self, role: str, src: torch.Tensor, device) -> None:
        """Keep one part; with both, dequantize into the destination (and drop them)."""
        self.parts[role] = src.to(device)
        if len(self.parts) < len(_PARTS):
            return
        w, s = (self.parts.pop(p) for p in _PARTS)
        if w.dtype != FP8_DTYPE or s.dtype != torch.float32:
            raise ValueError(f"checkpoint tensor {self.name!r} is not FP8 as quantization_config says: weight is "
                             f"{w.dtype} (float8_e4m3fn expected) and weight_scale_inv {s.dtype} (float32 expected).")
        # float64 when the model is: an e4m3 value times a float32 scale is exact there (and in float32)
        wide = torch.promote_types(self.dest.dtype, torch.float32)
        part = _select(block_dequantize(w, s, self.block, wide), self.source)  # ValueError on a bad scale shape
        if self.rearranged is not None:
            self.rearranged.put(part, device)
            return
        if tuple(part.shape) != tuple(self.dest.shape):
            raise ValueError(f"checkpoint tensor {self.name!r} read as {tuple(part.shape)}, expected "
                             f"{tuple(self.dest.shape)} from config.json.")
        self.dest.copy_(part.to(dtype=self.dest.dtype))


def _select(t: torch.Tensor, source: tuple) -> torch.Tensor:
    """`t[source]` as the loader reads a source (engine/rank/loader._read): dimension by dimension, so a row order
    and a column slice compose."""
    for dim, part in enumerate(source):
        t = t[(slice(None),) * dim + (part,)]
    return t



def fp8_linear_plan(plan: WeightPlan, names: Iterable[str], block: tuple[int, int]) -> WeightPlan:
    """`plan` with every float destination whose checkpoint weight `X.weight` has an `X.weight_scale_inv` in `names`
    read through an Fp8Dequant (module docstring)."""
    names = set(names)
    out = dict(plan)
    for name, (dest, idx, source) in plan.items():
        base = name[: -len("weight")]
        scale = base + "weight_scale_inv"
        if not name.endswith(".weight") or scale not in names or scale in plan:
            continue
        rearranged = dest if isinstance(dest, Rearranged) else None
        held = dest.dest if rearranged is not None else dest
        if not isinstance(held, torch.Tensor) or not held.is_floating_point() or held.dtype == FP8_DTYPE:
            continue  # an FP8 linear, the experts, QuantizeOnLoad, or a destination of another kind
        target = Fp8Dequant(held[idx] if idx and rearranged is None else held, rearranged, tuple(source), name, block)
        out[name] = PlanEntry(Part(target, "weight"), (), ())
        out[scale] = PlanEntry(Part(target, "weight_scale_inv"), (), ())
    return out


__all__ = ["Fp8Dequant", "fp8_linear_plan"]
