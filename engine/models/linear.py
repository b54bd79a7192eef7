"""Dense linears behind one seam: a `Linear` holds its weight as its `LinearMethod` says (float, or FP8
block-scaled with `weight_scale_inv` beside it) and runs the matching kernel, as vLLM's quant_method objects do.

Legend: T tokens, K input features, N output features (rows), Nb / Kb block counts (kernels/fp8.py).

Which linears: attention projections (GQA's stacked qkv and o; MLA's fused q_a / kv_a, q_b, kv_b, o), dense
MLPs and shared experts. The router gate, norms, embeddings and lm_head stay float, as DeepSeek and Qwen
publish them, and are plain parameters elsewhere.

Stacking (qkv_proj, gate_up_proj, MLA's q_a + kv_a): a Linear made of `pieces` holds them in one weight,
one matmul. FP8 pieces stack with their scale rows, so each piece starts on a block boundary: the method
places a piece that follows a ragged one at the next multiple of Bn (`piece_starts`), the rows between held
as zeros, computed and never read (`split` returns each piece's columns). Most published checkpoints need no
gap (DeepSeek-V3: q_a 1536 rows then kv_a 576; Qwen3: q 4096, k 512, v 512); DeepSeek-V2-Lite's dense MLP
does (intermediate_size 10944 = 85.5 blocks: up starts at 11008, 64 zero rows, +0.3 % of its matmul).
Quantized apart (as the checkpoint ships them, or as online quantization reads them), each piece keeps
exactly its own blocks and scales.

A weight read in a row order that moves rows out of their blocks (`keeps_blocks`: a rope de-interleave across a block,
gated attention's q / gate regrouping; a family's own cases: GLM-5.3-Flash's NoPE MLA, gated DeltaNet's fused rows)
is built FloatLinear: an FP8 checkpoint's weight is dequantized as it loads (engine/rank/fp8_linears.py).
"""
from __future__ import annotations

import itertools
from typing import Any, Protocol

import torch
from torch import nn
import torch.nn.functional as F

from moelink.kernels.fp8 import FP8_DTYPE, block_dequantize, block_scale_shape, reference_fp8_linear
from moelink.moe.expert_weights import fp8_plan
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..config.quantization import QuantConfig
from ..tp.linear import LinearParallel, Replicated


class FloatLinear:
    """The weight in the model dtype; F.linear."""

    name = "float"

    def piece_starts(self, pieces: tuple[int, ...]) -> tuple[int, ...]:
        """First row of each stacked piece: one after the other."""
        return tuple(itertools.accumulate(pieces[:-1], initial=0))

    def create(self, layer: "Linear", n: int, k: int, dtype, device) -> None:
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=dtype, device=device), requires_grad=False)
        layer.weight_scale_inv = None

    def apply(self, layer: "Linear", x_TK: torch.Tensor, bias_N: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x_TK, layer.weight, bias_N)

    def weight_plan(self, layer: "Linear", name: str, index: tuple, rows: tuple, piece: int = 0) -> WeightPlan:
        return {name: PlanEntry(layer.weight, index, layer.parallel.source(piece, rows))}


class Fp8Linear:
    """float8_e4m3fn weight [N, K] with float32 weight_scale_inv [Nb, Kb]; W8A8 through kernels.fp8_linear
    (activations quantized per token per Bk channels). `online`: the checkpoint is float and each weight is
    block-quantized as it loads."""

    name = "fp8"

    def __init__(self, block: tuple[int, int], online: bool = False):
        self.block, self.online = (int(block[0]), int(block[1])), online

    def piece_starts(self, pieces: tuple[int, ...]) -> tuple[int, ...]:
        """First row of each stacked piece: each on a block boundary (the module docstring: why)."""
        bn, starts, row = self.block[0], [], 0
        for n in pieces:
            starts.append(row)
            row += -(-n // bn) * bn
        return tuple(starts)

    def create(self, layer: "Linear", n: int, k: int, dtype, device) -> None:
        # Gap rows between pieces start as zeros (finite, never read) rather than whatever memory held.
        make = torch.zeros if n > sum(layer.pieces) else torch.empty
        layer.weight = nn.Parameter(make(n, k, dtype=FP8_DTYPE, device=device), requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(make(*block_scale_shape(n, k, self.block), dtype=torch.float32,
                                                   device=device), requires_grad=False)

    def apply(self, layer: "Linear", x_TK: torch.Tensor, bias_N: torch.Tensor | None) -> torch.Tensor:
        lead = x_TK.shape[:-1]
        y_TN = layer.fp8_linear(x_TK.reshape(-1, x_TK.shape[-1]), layer.weight, layer.weight_scale_inv,
                                block=self.block, bias_N=bias_N)
        return y_TN.view(*lead, y_TN.shape[-1])

    def weight_plan(self, layer: "Linear", name: str, index: tuple, rows: tuple, piece: int = 0) -> WeightPlan:
        src = layer.parallel.source(piece, rows)
        if rows and not self.online:
            _check_block_preserving(name, src[0], self.block[0])
        # A row order that keeps every row in its block leaves the block scales where they are; a TP shard reads
        # the block rows (or columns) of its own rows (or columns) only.
        return fp8_plan(name, layer.weight, layer.weight_scale_inv, index, self.block, self.online, src,
                        layer.parallel.scale_source(piece, self.block))


def _check_block_preserving(name: str, order: torch.Tensor, bn: int) -> None:
    """Rows of an FP8 weight may be reordered at load (DeepSeek-V3's rope de-interleave) only within their
    block: a row that left its block would be scaled by another block's scale."""
    if not isinstance(order, torch.Tensor):
        return
    # A TP shard's order holds its own rows, from a block boundary on: compared from its first row.
    lo = int(order.min()) // bn * bn if len(order) else 0
    if not torch.equal((order - lo) // bn, torch.arange(len(order)) // bn):
        raise ValueError(f"checkpoint tensor {name!r}: its rows are reordered at load (rope de-interleave) across "
                         f"FP8 blocks of {bn} rows; this layout is not supported with weight_block_size[0]={bn}.")


LinearMethod = FloatLinear | Fp8Linear


def keeps_blocks(method: LinearMethod, *orders: tuple) -> LinearMethod:
    """`method`, or FloatLinear where it is an FP8 checkpoint's and one of the checkpoint row orders `orders` (a
    plan's `rows`: (order,) or ()) moves a row out of its block (a de-interleave whose rope part straddles a block):
    that weight is then held float, dequantized as it loads (engine/rank/fp8_linears.py). Online quantization
    reorders the float rows before quantizing, so it keeps FP8."""
    if not isinstance(method, Fp8Linear) or method.online:
        return method
    bn = method.block[0]
    for rows in orders:
        order = rows[0] if rows else None
        if isinstance(order, torch.Tensor) and not torch.equal(order // bn, torch.arange(len(order)) // bn):
            return FloatLinear()
    return method


def linear_method(quant: QuantConfig | None, *modules: str) -> LinearMethod:
    """The method of a linear made of the checkpoint modules `modules` (one, or the pieces of a stack, e.g.
    ".q_proj", ".k_proj", ".v_proj" under a layer): FP8 when the model is quantized and the modules are not
    listed in modules_to_not_convert. Stacked pieces must agree."""
    if quant is None:
        return FloatLinear()
    quantized = {m: quant.is_quantized(m) for m in modules}
    if len(set(quantized.values())) > 1:
        raise ValueError(f"quantization_config.modules_to_not_convert lists some of {sorted(modules)} but not all: "
                         f"moelink stacks them into one matmul, so they must be all FP8 or all float.")
    return Fp8Linear(quant.block, quant.online) if all(quantized.values()) else FloatLinear()


class LinearHook(Protocol):
    """What runs after a linear's own matmul when set (`Linear.lora`): a LoRA adapter's per-row delta added to
    the output (engine/lora/layer.py). Set only when LoRA is enabled: without it a linear runs as it did."""

    def __call__(self, x_TK: torch.Tensor, y_TN: torch.Tensor) -> torch.Tensor: ...


class Linear(nn.Module):
    """y = x W^T (+ bias, held by the caller: stacked biases load by their own names, at `piece_rows`).
    `out_features`: the output width, or the widths of the stacked pieces (q, k, v); the weight holds
    `rows` = each piece at its `starts` row (gaps between FP8 pieces: the module docstring), and `split`
    cuts an output into the pieces. `weight` (and `weight_scale_inv` for FP8) as `method` creates them.
    dequantize_after_load: hold the weight float after loading (MLA's kv_b_proj, which is absorbed into other
    matmuls rather than applied to activations).
    parallel: how the weight is split over a TP group (engine/tp/linear.py; default whole): `in_features` and the pieces
    are this rank's widths."""

    weight: nn.Parameter  # made by `method.create`
    weight_scale_inv: nn.Parameter | None  # FP8's block scales (None: a float weight)
    lora: LinearHook | None = None  # LoRA's hook (engine/lora/), set by the rank when LoRA is enabled

    def __init__(self, in_features: int, out_features: int | tuple[int, ...], method: LinearMethod, kernels, dtype,
                 device=None, dequantize_after_load: bool = False, parallel: LinearParallel | None = None):
        super().__init__()
        self.parallel = parallel if parallel is not None else Replicated()
        self.pieces = tuple(out_features) if isinstance(out_features, (tuple, list)) else (out_features,)
        self.in_features, self.out_features, self.dtype = in_features, sum(self.pieces), dtype
        self.method = method
        self.starts = method.piece_starts(self.pieces)
        self.rows = self.starts[-1] + self.pieces[-1]
        if dequantize_after_load and len(self.pieces) > 1:
            raise ValueError("dequantize_after_load takes one piece: a float weight has no gaps to close.")
        self.dequantize_after_load = dequantize_after_load
        # A TritonKernels without the FP8 GEMM yet runs the reference (correct, slower).
        self.fp8_linear = getattr(kernels, "fp8_linear", reference_fp8_linear)
        method.create(self, self.rows, in_features, dtype, device)

    def forward(self, x_TK: torch.Tensor, bias_N: torch.Tensor | None = None) -> torch.Tensor:
        """[..., rows]: every piece's columns (and any gap's, which `split` drops); a row-parallel linear's summed
        over its TP group (the bias added once, after the sum)."""
        if isinstance(self.parallel, Replicated):
            y = self.method.apply(self, x_TK, bias_N)
            return y if self.lora is None else self.lora(x_TK, y)
        y = self.method.apply(self, x_TK, None)
        if self.lora is not None:  # before the collective: a row-parallel shard's delta is its partial sum too
            y = self.lora(x_TK, y)
        return self.parallel.finish(y, bias_N)

    def piece_rows(self, i: int) -> slice:
        """Rows of piece `i` in the weight (and in a stacked bias, and columns in the output)."""
        return slice(self.starts[i], self.starts[i] + self.pieces[i])

    def split(self, y_TN: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The pieces of an output [..., rows], as views [..., piece] (no gaps)."""
        return tuple(y_TN[..., self.piece_rows(i)] for i in range(len(self.pieces)))

    def weight_plan(self, name: str, piece: int = 0, rows: tuple = ()) -> WeightPlan:
        """Checkpoint `name` ("...q_proj.weight") → this weight (the rows of piece `piece`, for a stack), plus its
        scales for FP8; `rows`: a checkpoint row order to read it in (MLA's rope de-interleave)."""
        index = (self.piece_rows(piece),) if len(self.pieces) > 1 else ()
        return self.method.weight_plan(self, name, index, rows, piece)

    def process_weights_after_loading(self, updated: set[int] | None = None) -> None:
        """An FP8 weight held float (dequantize_after_load), once: a weight update then writes float values into
        the float weight (its plan names it so), and there is nothing left to convert."""
        if self.dequantize_after_load and isinstance(self.method, Fp8Linear):
            w = block_dequantize(self.weight.data, self.weight_scale_inv.data, self.method.block, self.dtype)
            self.method = FloatLinear()
            self.weight = nn.Parameter(w, requires_grad=False)
            self.weight_scale_inv = None

    def lora_rows(self) -> bool:
        """Whether a LoRA hook may run on this linear: one applied to activations (MLA's kv_b_proj is absorbed into
        other matmuls). Its weight's format does not matter: the adapter's delta is its own float matmuls on the
        linear's input (an FP8 linear's, before the linear quantizes it), added to the output."""
        return not self.dequantize_after_load

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, method={self.method.name}, tp={self.parallel.name}"


def lora_targets(model: nn.Module, plan: WeightPlan) -> dict[str, tuple[Linear, slice, Any, Any]]:
    """The model's linears a LoRA adapter may target, by checkpoint module name ("model.layers.0.self_attn.q_proj")
    → (the Linear, the rows of its output that module is: a piece of a stacked projection, the checkpoint rows
    those hold and the checkpoint columns its input is, each None for all, as stored): from the weight plan's source
    of each weight of a linear applied to activations (float or FP8). A row selector is a slice (a TP shard's rows)
    or an index (MLA's rope de-interleave); a column selector a TP row-parallel shard's input columns. An adapter's B
    is read at those rows, its A at those columns."""
    by_weight = {id(m.weight): m for m in model.modules() if isinstance(m, Linear) and m.lora_rows()}
    out = {}
    for name, entry in plan.items():
        lin = by_weight.get(id(entry.dest))
        if lin is None or not name.endswith(".weight"):
            continue
        rows = entry.index[0] if entry.index else slice(0, lin.rows)
        src = tuple(entry.source)
        row_sel = src[0] if src and not (isinstance(src[0], slice) and src[0] == slice(None)) else None
        col_sel = src[1] if len(src) == 2 else None
        n = rows.stop - rows.start if isinstance(rows, slice) else -1
        ok_rows = row_sel is None or (isinstance(row_sel, slice) and row_sel.stop - row_sel.start == n) or (
            isinstance(row_sel, torch.Tensor) and row_sel.dim() == 1 and len(row_sel) == n)
        if isinstance(rows, slice) and len(src) <= 2 and ok_rows and (col_sel is None or isinstance(col_sel, slice)):
            out[name[: -len(".weight")]] = (lin, rows, row_sel, col_sel)
    return out
