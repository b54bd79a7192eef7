"""MXFP4 routed experts published split, one tensor per expert projection (DeepSeek-V4's FP4 experts, as
engine/config/fp4_experts.py and engine/models/deepseek_v4/reader.py read them): per expert, `w1` / `w3` / `w2`
each a packed e2m1 `weight` [N, K/2] (two values a byte along K, the low nibble the even element; int8, uint8 or
float4_e2m1fn_x2 on disk) and a `scale` [N, K/32] in float8_e8m0fnu (one power-of-two scale per 32 values).

That is MXFP4's encoding bit for bit (kernels/mxfp4.py: same e2m1 table, same nibble order, E8M0 with bias 127),
so the experts are held as `Mxfp4Experts` holds gpt-oss's (blocks [E, F, K/32, 16], scales [E, F, K/32], [gate; up]
rows) and run by the same W4A16 kernels with V4's clamped SwiGLU; only the on-disk layout differs: per expert,
gate (w1) and up (w3) as separate tensors instead of gpt-oss's fused, interleaved gate_up. A row [K/2] of bytes is
a row [K/32, 16] of blocks, so the loader copies each tensor's bytes as they are (`PackedBytes`), no repacking.

Legend: E local experts, D hidden, I expert intermediate size, F = 2I, S = (reduction dim) / 32, Q = 16 bytes.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .expert_weights import Mxfp4Experts
from .weight_plan import PlanEntry, WeightPlan

# On-disk dtypes of one byte that hold packed e2m1 pairs or E8M0 exponents (safetensors I8 / U8 / F4 / F8_E8M0).
_BYTE_DTYPES = tuple(d for d in (torch.int8, torch.uint8, getattr(torch, "float4_e2m1fn_x2", None),
                                 getattr(torch, "float8_e8m0fnu", None)) if d is not None)


class PackedBytes(NamedTuple):
    """A loader destination (engine/rank/loader.load_plan calls `put`): a uint8 view of packed e2m1 bytes
    ([N, S, Q]) or E8M0 scales ([N, S]) that takes the checkpoint tensor's bytes ([N, K/2] or [N, S]) unchanged."""

    dest: torch.Tensor
    name: str

    @property
    def source(self) -> tuple[tuple[int, ...], torch.dtype]:
        """The checkpoint tensor's (shape, dtype), as a `Repack` states it (load_format="dummy" makes it)."""
        return (self.dest.shape[0], self.dest[0].numel()), torch.uint8

    def put(self, src: torch.Tensor, device) -> None:
        if src.dtype not in _BYTE_DTYPES:
            raise ValueError(f"checkpoint tensor {self.name!r} is {src.dtype}: DeepSeek-V4's FP4 experts hold packed "
                             "e2m1 bytes (int8 / uint8 / float4_e2m1fn_x2) and float8_e8m0fnu scales.")
        want = (self.dest.shape[0], self.dest[0].numel())
        if tuple(src.shape) != want:
            raise ValueError(f"checkpoint tensor {self.name!r} has shape {tuple(src.shape)}, expected {want} from "
                             "config.json (FP4: [N, K/2] bytes, scales [N, K/32]).")
        self.dest.copy_(src.view(torch.uint8).to(device).reshape(self.dest.shape))


class SplitMxfp4Experts(Mxfp4Experts):
    """MXFP4 expert storage and kernels (Mxfp4Experts), read from the per-expert layout (module docstring)."""

    name = "mxfp4_split"

    def weight_plan(self, layer: nn.Module, m: str, fused: bool, expert_ids: list[int], rows: tuple,
                    names: tuple[str, str, str]) -> WeightPlan:
        """This rank's experts only, under `m` ("model.layers.{i}.ffn."): `experts.{e}.{w1,w3,w2}.{weight,scale}`;
        w1 fills w13's gate rows [0, I), w3 its up rows [I, 2I)."""
        if fused:
            raise ValueError(f"FP4 experts under {m!r} must be stored per expert (experts.{{e}}.w1.weight ...), as "
                             "DeepSeek publishes V4: fused FP4 expert tensors are not a published layout.")
        inter = layer.w2_blocks_EDSQ.shape[2] * 32
        gate, up, down = names
        plan: WeightPlan = {}
        for local, e in enumerate(expert_ids):
            for name, rows_ in ((gate, slice(0, inter)), (up, slice(inter, 2 * inter))):
                p = f"{m}experts.{e}.{name}."
                plan[p + "weight"] = PlanEntry(PackedBytes(layer.w13_blocks_EFSQ[local, rows_], p + "weight"))
                plan[p + "scale"] = PlanEntry(PackedBytes(layer.w13_scales_EFS[local, rows_], p + "scale"))
            p = f"{m}experts.{e}.{down}."
            plan[p + "weight"] = PlanEntry(PackedBytes(layer.w2_blocks_EDSQ[local], p + "weight"))
            plan[p + "scale"] = PlanEntry(PackedBytes(layer.w2_scales_EDS[local], p + "scale"))
        return plan


__all__ = ["PackedBytes", "SplitMxfp4Experts"]
