"""NVFP4 weights outside the routed experts, dequantized as they load.

ModelOpt's NVFP4 exports quantize more than the routed experts unless its `ignore` list says otherwise (shared
experts, dense MLPs, often the attention projections). moelink runs NVFP4 for the routed experts only (the
fused MoE, moe/expert_weights.Nvfp4Experts, where nearly all the bytes are); every other linear holds its weight
in the model dtype, so such a tensor is dequantized once at load: e2m1 x weight_scale x weight_scale_2
(kernels/nvfp4.nvfp4_dequantize: exact in float64, one rounding from float32 otherwise). Its input_scale (W4A4's
activation scale) is not read.

How: `nvfp4_linear_plan` rewrites a weight plan so that each float destination whose checkpoint tensor
`X.weight` has an `X.weight_scale_2` beside it reads three tensors (`X.weight`, `X.weight_scale`,
`X.weight_scale_2`) into one `Nvfp4Dequant`, which writes the destination when it has all three (the loader reads
tensors one at a time, file by file). A row order the plan reads the weight in (MLA's rope de-interleave) reads
the packed bytes and the block scales alike: each row carries its own bytes and scales, so permuting rows is
exact. A row-parallel tensor-parallel shard (o_proj, down_proj: its input columns) reads its columns' packed bytes
and their scales, whole groups of 16 (`column_range`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from moelink.kernels.nvfp4 import nvfp4_dequantize
from moelink.moe.weight_plan import Part, PlanEntry, WeightPlan

_PARTS = ("weight", "weight_scale", "weight_scale_2")
GROUP = 16  # values per e4m3 scale


def column_range(name: str, source: tuple, group: int) -> tuple[int, int]:
    """[a, b) of a row-parallel TP shard's source (all rows, columns a..b of the unpacked weight), both on a group
    boundary (a shard reads whole groups of packed values and their scales), else one ValueError naming why."""
    rows, cols = source
    if rows != slice(None) or not isinstance(cols, slice) or (cols.start or 0) % group or cols.stop is None \
            or cols.stop % group:
        raise ValueError(f"checkpoint tensor {name!r} is quantized in groups of {group} along its input columns, and "
                         f"a tensor-parallel rank reads {source!r} of it: a rank's columns must start and end on a "
                         f"group (tensor_parallel_size must divide the input width into whole groups).")
    return cols.start or 0, cols.stop


@dataclass
class Nvfp4Dequant:
    """The float destination of one NVFP4 checkpoint weight and the parts read so far."""

    dest: torch.Tensor
    name: str
    parts: dict = field(default_factory=dict)

    def put(self, role: str, src: torch.Tensor, device) -> None:
        """Keep one part; with all three, dequantize into the destination (and drop them)."""
        self.parts[role] = src.to(device)
        if len(self.parts) < len(_PARTS):
            return
        q, s, g = (self.parts.pop(p) for p in _PARTS)
        if q.dtype != torch.uint8 or g.numel() != 1:
            raise ValueError(f"checkpoint tensor {self.name!r} is not NVFP4 as ModelOpt writes it: weight is {q.dtype} "
                             f"(uint8 e2m1 pairs expected) and weight_scale_2 has {g.numel()} values (one expected).")
        w = nvfp4_dequantize(q, s, g.reshape(()), self.dest.dtype)  # ValueError naming the shapes if they disagree
        if tuple(w.shape) != tuple(self.dest.shape):
            raise ValueError(f"checkpoint tensor {self.name!r} dequantizes to shape {tuple(w.shape)}, expected "
                             f"{tuple(self.dest.shape)} from config.json.")
        self.dest.copy_(w)



def nvfp4_linear_plan(plan: WeightPlan, names: Iterable[str]) -> WeightPlan:
    """`plan` with every float destination whose checkpoint weight is NVFP4 (an `X.weight_scale_2` in `names`)
    read through an Nvfp4Dequant (module docstring); the routed experts' uint8 destinations stay as they are."""
    names = set(names)
    out = dict(plan)
    for name, (dest, idx, source) in plan.items():
        base = name[: -len("weight")]
        if not name.endswith(".weight") or base + "weight_scale_2" not in names:
            continue
        if not isinstance(dest, torch.Tensor) or not dest.is_floating_point():
            continue  # NVFP4 experts (uint8), or a destination of another kind
        scale_source = source
        if len(source) > 1:  # a row-parallel TP shard's columns: its bytes (2 values each) and its groups' scales
            a, b = column_range(name, source, GROUP)
            source, scale_source = (slice(None), slice(a // 2, b // 2)), (slice(None), slice(a // GROUP, b // GROUP))
        target = Nvfp4Dequant(dest[idx] if idx else dest, name)
        out[name] = PlanEntry(Part(target, "weight"), (), source)
        out[base + "weight_scale"] = PlanEntry(Part(target, "weight_scale"), (), scale_source)
        out[base + "weight_scale_2"] = PlanEntry(Part(target, "weight_scale_2"), (), ())
    return out
