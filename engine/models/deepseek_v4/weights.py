"""DeepSeek-V4's FP8 weights as published (engine/models/deepseek_v4/reader.py): held FP8 where a linear runs them,
dequantized as they load where nothing runs FP8.

V4-Flash / V4-Pro ship attention's linears, the shared expert, the MTP layer's e_proj / h_proj (and, without
`expert_dtype: fp4`, the routed experts) as float8_e4m3fn `X.weight` with `X.scale` beside it: one scale per
weight_block_size block, stored as float8_e8m0fnu (ue8m0, a power of two) or float32.

Held FP8 (W8A8, engine/models/linear.Fp8Linear: the kernel strategy's `fp8_linear`, the reference on CPU, Triton on
GPU): attention's wq_a, wq_b, wkv, wo_a, wo_b, the indexer's wq_b and the shared expert's w1 / w2 / w3, each a
`Linear` (`dsv4_linear_method`). `published_linear_plan` reads `X.weight` as it is and `X.scale` into the float32
block scales the FP8 path takes (`weight_scale_inv`: the loader converts an e8m0 scale to float32, exactly: it is a
power of two). This halves those weights' bytes against bf16.

wo_a, the grouped low-rank output projection ([G * O, d]: group g's O rows project its d channels), runs group by
group through the same FP8 GEMM (`grouped_fp8_linear`: G GEMMs of [T, d] x [O, d], no grouped FP8 kernel needed).
Each group's rows must start on a block row of the scales; when O is not a multiple of the file's Bn (the tiny test
models: O = 8 in blocks of 16; published: O = 1024 in blocks of 128, already whole blocks) wo_a holds its scales in
rows of gcd(O, Bn), each file scale row repeated over the finer rows it covers: the same numbers, so still exact.

Dequantized at load (`fp8_dequant_plan`): what stays float in moelink, the MTP layer's e_proj / h_proj and FP8 routed
experts (held in the model dtype): e4m3 x its block's scale (engine/models/blocks/fp8_dequant.py, shared with
DeepSeek-V4.1: exact in float32 and float64, the scales being powers of two; one rounding into bf16). The FP4 experts, nearly all of V4's bytes, stay
packed (moe/expert_weights_mxfp4_split.py).

Under tensor parallelism a rank reads its shard of each FP8 linear (engine/tp/linear.py: wq_b's and wo_a's rows,
wo_b's columns, the split shared expert's) with the block rows / columns of the scales that cover it; wo_a's rank rows
may start inside a file block (its finer held rows: the file rows covering them, repeated, the leading ones dropped).
FP8 routed experts split by intermediate size read their slice and the scale blocks covering it.

How: `fp8_dequant_plan` (blocks/fp8_dequant.py) rewrites a weight plan so that each float destination whose
checkpoint tensor `X.weight` has an `X.scale` beside it reads both into one `Fp8Dequant`, which writes the destination
when it has both (the loader reads tensors one at a time, file by file); FP8 destinations (the linears above) it
leaves as they are.

Legend: T tokens, G groups, O rows per group, d channels per group, N rows, K channels.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from moelink.moe.weight_plan import PlanEntry, Rearranged, WeightPlan

from .reader import DSV4Quantization
from ...tp.linear import ColumnParallel
from ..blocks.fp8_dequant import fp8_dequant_plan
from ..linear import FloatLinear, Fp8Linear, Linear, LinearMethod

def dsv4_linear_method(quant: DSV4Quantization | None, group_rows: int | None = None) -> LinearMethod:
    """How a V4 linear holds its weight: float for a float checkpoint, FP8 in the checkpoint's blocks for a published
    one. `group_rows`: wo_a's rows per group O, whose scales are held in rows of gcd(O, Bn) (module docstring)."""
    if quant is None:
        return FloatLinear()
    bn, bk = quant.block
    return Fp8Linear((math.gcd(group_rows, bn) if group_rows else bn, bk))


def published_linear_plan(linear: Linear, name: str, file_block_rows: int | None = None) -> WeightPlan:
    """`linear.weight_plan(name)` under V4's published names: an FP8 linear's scales are `X.scale` (not
    `X.weight_scale_inv`), read into its float32 scales (the loader converts ue8m0 exactly). `file_block_rows`: the
    file's Bn where the linear holds finer scale rows (wo_a's groups): each file scale row repeated over them."""
    plan = linear.weight_plan(name)
    scale_name = name[: -len(".weight")] + ".weight_scale_inv"
    if scale_name not in plan:
        return plan  # a float linear
    dest, idx, source = plan.pop(scale_name)
    held_rows = linear.method.block[0]
    if file_block_rows is not None and file_block_rows != held_rows:
        rows, cols = dest.shape
        repeat = file_block_rows // held_rows  # held_rows = gcd(O, Bn) divides Bn
        # A TP rank's rows [a, a + n) of the weight (its groups: ColumnParallel) may start inside a file block: it
        # reads the file scale rows covering them and drops the finer rows before a.
        a, n = (linear.parallel.row_starts[0], linear.parallel.widths[0]) if isinstance(linear.parallel, ColumnParallel) \
            else (0, rows * held_rows)
        first = a // file_block_rows
        source = (slice(first, -(-(a + n) // file_block_rows)),) if a or n != rows * held_rows else source
        skip = (a - first * file_block_rows) // held_rows
        scale_file_name = name[: -len(".weight")] + ".scale"

        def finer(s_NbKb: torch.Tensor) -> torch.Tensor:
            want = (-(-(skip + rows) // repeat), cols)  # the file's [ceil(N / Bn), ceil(K / Bk)] (of the rank's rows)
            if tuple(s_NbKb.shape) != want:  # a longer one would otherwise be cut silently
                raise ValueError(f"checkpoint tensor {scale_file_name!r} has shape {tuple(s_NbKb.shape)}, expected "
                                 f"{want} from config.json and weight_block_size.")
            return s_NbKb.to(torch.float32).repeat_interleave(repeat, dim=0)[skip:skip + rows]

        # load_format="dummy" makes the file's coarse rows (float32: the loader reads ue8m0 into float32 anyway)
        dest, idx = Rearranged(dest[idx] if idx else dest, finer,
                               source=((-(-(skip + rows) // repeat), cols), torch.float32)), ()
    plan[name[: -len(".weight")] + ".scale"] = PlanEntry(dest, idx, source)
    return plan


def grouped_fp8_linear(linear: Linear, x_TGd: torch.Tensor, float_grouped: Callable) -> torch.Tensor:
    """wo_a: group g of x [T, G, d] through rows [g O, (g + 1) O) of `linear` ([G O, d]); [T, G, O] in x's dtype.
    A float linear runs the kernel strategy's grouped GEMM `float_grouped` (grouped_linear); an FP8 one runs
    each group through the FP8 GEMM, its activations quantized per token per Bk of the group's d channels."""
    T, G, _ = x_TGd.shape
    O = linear.out_features // G
    w_NK = linear.weight
    if not isinstance(linear.method, Fp8Linear):
        return float_grouped(x_TGd, w_NK.view(G, O, -1))
    block = linear.method.block
    nb = O // block[0]  # scale rows per group: the method's Bn divides O (dsv4_linear_method)
    out_TGO = x_TGd.new_empty(T, G, O)
    for g in range(G):
        out_TGO[:, g] = linear.fp8_linear(x_TGd[:, g], w_NK[g * O:(g + 1) * O],
                                          linear.weight_scale_inv[g * nb:(g + 1) * nb], block=block)
    return out_TGO


__all__ = ["dsv4_linear_method", "fp8_dequant_plan", "grouped_fp8_linear", "published_linear_plan"]
