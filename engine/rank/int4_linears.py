"""INT4 weights outside the routed experts, dequantized as they load.

Kimi K2 Thinking / K2.5 keep everything but the routed experts in bf16, but community W4A16 / GPTQ / AWQ releases of
Qwen3-MoE and DeepSeek quantize the attention projections, dense MLPs and shared experts too. moelink runs INT4 for
the routed experts only (the fused MoE, moe/expert_weights_int4.Int4Experts, where nearly all the bytes are); every
other linear holds its weight in the model dtype, so such a tensor is dequantized once at load
(kernels/int4.int4_dequantize: (u - z) * s, exact in float32 / float64, one rounding to the model dtype).

Which: a float destination whose checkpoint tensor `X.weight` is absent while `X.weight_packed` (compressed-tensors)
or `X.qweight` (GPTQ / AWQ) is present: the files say which modules are INT4, whatever the config's target / ignore
patterns spell. `int4_linear_plan` rewrites the plan so the parts (`weight_packed`, `weight_scale`, and
`weight_zero_point` when asymmetric; `qweight`, `scales`, `qzeros`) are read into one `Int4Dequant`, which writes
the destination when it has them all, in the row order the plan reads the weight in (MLA's rope de-interleave:
applied to the dequantized rows). A row-parallel tensor-parallel shard (o_proj, down_proj) reads only its input
columns' words, scales and zero points, whole groups (`_column_parts`); a column-parallel one (q/k/v, gate/up)
only its output rows' (`_row_parts`; where the rows do not fall on whole packed words, the whole tensor is read and
its rows kept after dequantizing).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch

from moelink.kernels.int4 import awq_to_rows, gptq_qweight_rows, gptq_zeros_rows, int4_dequantize, unpack_rows
from moelink.moe.weight_plan import Part, PlanEntry, WeightPlan

from .nvfp4_linears import column_range

if TYPE_CHECKING:
    from ..config.quantization_int4 import Int4Config

_PARTS = {"compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point"),
          "gptq": ("qweight", "scales", "qzeros"), "awq": ("qweight", "scales", "qzeros")}


@dataclass
class Int4Dequant:
    """The float destination of one INT4 checkpoint weight, its row order, and the parts read so far."""

    dest: torch.Tensor
    name: str
    quant: Int4Config
    rows: tuple
    parts: dict = field(default_factory=dict)

    def needed(self) -> tuple[str, ...]:
        q, s, z = _PARTS[self.quant.layout]
        return (q, s) if self.quant.symmetric else (q, s, z)

    def put(self, role: str, src: torch.Tensor, device) -> None:
        self.parts[role] = src.to(device)
        if len(self.parts) < len(self.needed()):
            return
        q, s, z = (self.parts.pop(p, None) for p in _PARTS[self.quant.layout])
        layout = self.quant.layout
        if layout == "gptq":
            q, s = gptq_qweight_rows(q), s.transpose(0, 1).contiguous()
            z = None if z is None else gptq_zeros_rows(z, self.quant.gptq_v1)
        elif layout == "awq":
            q, s, z = awq_to_rows(q, pack=True), s.transpose(0, 1).contiguous(), awq_to_rows(z, pack=False)
        elif z is not None:
            z = unpack_rows(z, q.shape[0])
        work = torch.float64 if self.dest.dtype == torch.float64 else torch.float32
        w = int4_dequantize(q, s.to(work), z, work)  # ValueError naming the shapes if they disagree
        if self.rows:
            w = w[self.rows]
        if tuple(w.shape) != tuple(self.dest.shape):
            raise ValueError(f"checkpoint tensor {self.name!r} dequantizes to shape {tuple(w.shape)}, expected "
                             f"{tuple(self.dest.shape)} from config.json.")
        self.dest.copy_(w.to(self.dest.dtype))



def _column_parts(name: str, source: tuple, quant) -> dict[str, tuple]:
    """Each part's slice for the input columns [a, b) a row-parallel TP shard reads (whole groups: a rank reads its
    columns' packed words, scales and zero points only), in the checkpoint's layout: compressed-tensors' [N, K/8],
    [N, K/G], zero points [N/8, K/G] (columns); GPTQ's qweight [K/8, N], AWQ's [K, N/8], their scales [K/G, N] and
    zeros [K/G, N/8] (rows)."""
    g = quant.group_size
    a, b = column_range(name, source, g)
    groups = slice(a // g, b // g)
    q, s, z = _PARTS[quant.layout]
    if quant.layout == "compressed-tensors":
        return {q: (slice(None), slice(a // 8, b // 8)), s: (slice(None), groups), z: (slice(None), groups)}
    words = slice(a // 8, b // 8) if quant.layout == "gptq" else slice(a, b)
    return {q: (words,), s: (groups,), z: (groups,)}


def _row_parts(rows: slice, quant) -> dict[str, tuple] | None:
    """Each part's slice for the output rows [a, b) a column-parallel TP shard reads (its rows' packed words, scales
    and zero points only), or None when the rows do not fall on whole packed words (then the whole tensor is read
    and cut after dequantizing). Rows are unpacked in compressed-tensors' weight and scales [N, ...] and packed by 8
    in its zero points [N/8, K/G]; GPTQ's qweight and scales are [., N] (unpacked), AWQ's qweight and both
    layouts' zeros [., N/8] (packed)."""
    a, b = rows.start or 0, rows.stop
    if b is None or rows.step not in (None, 1):
        return None
    q, s, z = _PARTS[quant.layout]
    packed_ok = a % 8 == 0 and b % 8 == 0
    words = slice(a // 8, b // 8)
    if quant.layout == "compressed-tensors":
        if not quant.symmetric and not packed_ok:
            return None
        return {q: (slice(a, b),), s: (slice(a, b),), z: (words,)}
    if not packed_ok and (quant.layout == "awq" or not quant.symmetric):
        return None
    qcols = slice(a, b) if quant.layout == "gptq" else words
    return {q: (slice(None), qcols), s: (slice(None), slice(a, b)), z: (slice(None), words)}


def int4_linear_plan(plan: WeightPlan, names: Iterable[str], quant) -> WeightPlan:
    """`plan` with every float destination whose checkpoint weight is INT4 (its packed tensor in `names`, no
    `X.weight`) read through an Int4Dequant (module docstring); the routed experts' int32 destinations stay."""
    names = set(names)
    packed = _PARTS[quant.layout][0]
    out = dict(plan)
    for name, (dest, idx, source) in plan.items():
        base = name[: -len("weight")]
        if not name.endswith(".weight") or name in names or base + packed not in names:
            continue
        if not isinstance(dest, torch.Tensor) or not dest.is_floating_point():
            continue
        parts = {}
        if len(source) > 1:  # a row-parallel TP shard: its input columns' words, scales and zero points
            parts, source = _column_parts(base + packed, source, quant), ()
        elif len(source) == 1 and isinstance(source[0], slice):  # a column-parallel shard: its rows' only
            rows = _row_parts(source[0], quant)
            if rows is not None:
                parts, source = rows, ()
        target = Int4Dequant(dest[idx] if idx else dest, base + packed, quant, source)
        del out[name]
        for role in target.needed():
            out[base + role] = PlanEntry(Part(target, role), (), parts.get(role, ()))
    return out
