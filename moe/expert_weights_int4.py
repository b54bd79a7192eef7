"""INT4 expert weights (W4A16, group-wise scales, optional zero points; kernels/int4.py has the layout): the expert
format of Kimi K2 Thinking / K2.5's compressed-tensors experts, and of GPTQ / AWQ releases rewritten into the same
layout as they load.

Legend: E local experts, D hidden, I expert intermediate size, F = 2I, W = (reduction dim) / 8 int32 words,
S = (reduction dim) / G groups.

`Int4Experts` holds, per local slot (all stacked on the slot axis, so EP reads a rank's experts only and online EPLB
moves an expert whole, moe/expert_move.py): `w13_q_EFW` int32 [E, 2I, D/8] ([gate; up] rows), `w13_s_EFS` [E, 2I, D/G]
(the model dtype), `w2_q_EDW` int32 [E, D, I/8], `w2_s_EDS` [E, D, I/G], and with zero points (asymmetric)
`w13_z_EFS` / `w2_z_EDS` uint8 (z as stored nibbles: the weight is (u - z) * s) → kernels.fused_moe_int4.

Checkpoint names per expert linear `experts.{e}.{gate,up,down}_proj.` (the only layout these exporters write):
- compressed-tensors: `weight_packed` (copied as it is), `weight_scale`, `weight_zero_point` (int32 [N/8, S],
  packed along N: unpacked at load by `Repack`); `weight_shape` is not loaded (engine/config/checkpoint_headers.py
  checks it against config.json before anything is sized);
- GPTQ: `qweight` int32 [K/8, N] (transposed at load: the same packing along K), `scales` [S, N] (transposed),
  `qzeros` [S, N/8] (unpacked, transposed, + 1 for checkpoint_format "gptq"); `g_idx` is not read (the config
  refuses desc_act, so it is k // G);
- AWQ: `qweight` [K, N/8] in AWQ's nibble order (unpacked and repacked along K at load), `qzeros` likewise, `scales`.
A `Repack` destination applies the rewrite as the tensor is read (engine/rank/loader.py calls its `put`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from moelink.kernels.int4 import GROUP_SIZES, PACK, awq_to_rows, gptq_qweight_rows, gptq_zeros_rows, unpack_rows
from .weight_plan import PlanEntry, WeightPlan

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


@dataclass(frozen=True)
class Repack:
    """Loader destination: `fn(checkpoint tensor)` written into `dest` (a view of a parameter). `source` is the
    checkpoint tensor's (shape, dtype), which load_format="dummy" makes."""

    dest: torch.Tensor
    fn: Callable[[torch.Tensor], torch.Tensor]
    source: tuple[tuple[int, ...], torch.dtype]
    name: str

    def put(self, src: torch.Tensor, device) -> None:
        if tuple(src.shape) != tuple(self.source[0]):
            raise ValueError(f"checkpoint tensor {self.name!r} has shape {tuple(src.shape)}, expected "
                             f"{tuple(self.source[0])} from config.json and its quantization_config.")
        t = self.fn(src.to(device))
        self.dest.copy_(t.to(dtype=self.dest.dtype))


def _param(*shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Int4Experts:
    """INT4 W4A16 experts (module docstring): `layout` is the checkpoint's ("compressed-tensors", "gptq", "awq")."""

    name = "int4"
    supports_extras = False  # no published INT4 MoE checkpoint has expert biases or a clamped SwiGLU

    def __init__(self, group: int, symmetric: bool, layout: str = "compressed-tensors", gptq_v1: bool = False):
        self.group, self.symmetric, self.layout, self.gptq_v1 = int(group), bool(symmetric), layout, bool(gptq_v1)

    def create(self, layer: nn.Module, num_local: int, hidden: int, inter: int, dtype, device) -> None:
        g = self.group
        for field, n in (("hidden_size", hidden), ("moe_intermediate_size", inter)):
            if n % g or n % PACK:
                raise ValueError(f"config.json {field}={n} is not supported with INT4 experts of group size {g}: it "
                                 f"must be a multiple of the group (one scale per {g} values).")
        layer.w13_q_EFW = _param(num_local, 2 * inter, hidden // PACK, dtype=torch.int32, device=device)
        layer.w13_s_EFS = _param(num_local, 2 * inter, hidden // g, dtype=dtype, device=device)
        layer.w2_q_EDW = _param(num_local, hidden, inter // PACK, dtype=torch.int32, device=device)
        layer.w2_s_EDS = _param(num_local, hidden, inter // g, dtype=dtype, device=device)
        layer.w13_z_EFS = layer.w2_z_EDS = None
        if not self.symmetric:
            layer.w13_z_EFS = _param(num_local, 2 * inter, hidden // g, dtype=torch.uint8, device=device)
            layer.w2_z_EDS = _param(num_local, hidden, inter // g, dtype=torch.uint8, device=device)

    def _linear(self, x: str, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> WeightPlan:
        """One expert linear `x` ("...experts.3.gate_proj.") into the [N, W] / [N, S] views q, s, z."""
        n, w = q.shape
        k, groups = w * PACK, s.shape[-1]
        i32 = torch.int32
        if self.layout == "compressed-tensors":
            plan = {x + "weight_packed": PlanEntry(q), x + "weight_scale": PlanEntry(s)}
            if z is not None:
                plan[x + "weight_zero_point"] = PlanEntry(Repack(z, lambda t: unpack_rows(t, n), ((-(-n // PACK), groups),
                                                                                                 i32), x + "weight_zero_point"))
            return plan
        t = lambda a: a.transpose(0, 1)  # noqa: E731  ([K.., N] -> [N, K..])
        if self.layout == "gptq":
            plan = {x + "qweight": PlanEntry(Repack(q, gptq_qweight_rows, ((w, n), i32), x + "qweight")),
                    x + "scales": PlanEntry(Repack(s, t, ((groups, n), s.dtype), x + "scales"))}
            if z is not None:
                v1 = self.gptq_v1
                plan[x + "qzeros"] = PlanEntry(Repack(z, lambda a: gptq_zeros_rows(a, v1),
                                                      ((groups, n // PACK), i32), x + "qzeros"))
            return plan
        plan = {x + "qweight": PlanEntry(Repack(q, lambda a: awq_to_rows(a, pack=True), ((k, n // PACK), i32),
                                                x + "qweight")),
                x + "scales": PlanEntry(Repack(s, t, ((groups, n), s.dtype), x + "scales"))}
        if z is not None:
            plan[x + "qzeros"] = PlanEntry(Repack(z, lambda a: awq_to_rows(a, pack=False), ((groups, n // PACK), i32),
                                                  x + "qzeros"))
        return plan

    def weight_plan(self, layer: nn.Module, m: str, fused: bool, expert_ids: list[int], rows: tuple,
                    names: tuple[str, str, str]) -> WeightPlan:
        """This rank's experts under `m` ("model.layers.{i}.mlp."), per expert as every INT4 exporter writes them."""
        if fused:
            raise ValueError(f"INT4 experts under {m!r} must be stored per expert (experts.{{e}}.gate_proj."
                             "weight_packed ...), as compressed-tensors, GPTQ and AWQ export them: fused INT4 expert "
                             "tensors are not a published layout.")
        inter = layer.w2_q_EDW.shape[-1] * PACK
        gate, up, down = names
        q13, s13, z13, q2, s2, z2 = (layer.w13_q_EFW, layer.w13_s_EFS, layer.w13_z_EFS, layer.w2_q_EDW,
                                     layer.w2_s_EDS, layer.w2_z_EDS)
        zv = lambda z, *i: None if z is None else z[i]  # noqa: E731
        plan: WeightPlan = {}
        for local, e in enumerate(expert_ids):
            p = f"{m}experts.{e}."
            for name, r in ((gate, slice(0, inter)), (up, slice(inter, 2 * inter))):
                plan.update(self._linear(f"{p}{name}.", q13[local, r], s13[local, r], zv(z13, local, r)))
            plan.update(self._linear(f"{p}{down}.", q2[local], s2[local], zv(z2, local)))
        return plan

    def run(self, kernels: Kernels, layer: nn.Module, x_ND, weights_NK, ids_NK) -> torch.Tensor:
        return kernels.fused_moe_int4(x_ND, layer.w13_q_EFW, layer.w13_s_EFS, layer.w2_q_EDW, layer.w2_s_EDS,
                                      weights_NK, ids_NK, w13_z_EFS=layer.w13_z_EFS, w2_z_EDS=layer.w2_z_EDS)


def int4_format(quant) -> Int4Experts:
    """The expert format of an Int4Config (engine/config/quantization.py)."""
    if quant.group_size not in GROUP_SIZES:
        raise ValueError(f"INT4 group size {quant.group_size} is not supported: {GROUP_SIZES}.")
    return Int4Experts(quant.group_size, quant.symmetric, quant.layout, quant.gptq_v1)
