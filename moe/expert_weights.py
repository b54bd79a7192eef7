"""Expert weight formats: how a MoE layer's stacked expert weights are held, loaded and multiplied.

Legend: E local experts, D hidden, I expert intermediate size, F = 2I (FP8: U + I, see Fp8BlockExperts), N tokens
(received), K top-k, Fb / Db / Ib block counts ceil(F / Bn), ceil(D / Bk) ... of an FP8 block-scaled weight
(kernels/fp8.py);
MXFP4 (kernels/mxfp4.py): S = (reduction dim) / 32 scale groups, Q = 16 packed bytes per group;
NVFP4 (kernels/nvfp4.py): B = (reduction dim) / 2 packed bytes, S = (reduction dim) / 16 scale groups.

One strategy object per format (ARCHITECTURE.md: Design rules 6), each owning its parameters (set on the MoE
layer, beside the router), its rows of the weight plan (per-expert and fused on-disk layouts, this rank's
experts only) and its kernel call, so the layer has no format branches:
- `FloatExperts`: w13_EFD = [gate; up], w2_EDI in the model dtype → kernels.fused_moe.
- `Fp8BlockExperts`: the same two weights in float8_e4m3fn with float32 `w13_scale_inv_EFD` [E, Fb, Db] and
  `w2_scale_inv_EDI` [E, Db, Ib] beside them → kernels.fused_moe_fp8. From an FP8 checkpoint each weight's
  `weight_scale_inv` (per expert) or `{gate_up,down}_proj_scale_inv` (fused, transformers' FP8Experts names)
  loads beside it; from a float checkpoint (`online`) the loader block-quantizes each weight as it reads it.
- `Mxfp4Experts`: gpt-oss's published MXFP4 experts: uint8 e2m1 blocks `w13_blocks_EFSQ` [E, F, D/32, 16] /
  `w2_blocks_EDSQ` [E, D, I/32, 16] with uint8 E8M0 scales `w13_scales_EFS` / `w2_scales_EDS` beside them, and
  the layer's float expert biases → kernels.fused_moe_mxfp4 (W4A16: activations stay in the model dtype).
- `Nvfp4Experts`: ModelOpt's NVFP4 experts (NVIDIA's FP4 DeepSeek-R1 / Qwen3): uint8 e2m1 pairs `w13_q_EFB`
  [E, 2I, D/2] / `w2_q_EDB` [E, D, I/2], float8_e4m3fn block scales `w13_scale_EFS` / `w2_scale_EDS` per 16
  values, float32 global scales `w13_scale2_E2` [E, 2] (gate's, up's) / `w2_scale2_E` [E], and the recorded
  (unused, W4A16) activation scales → kernels.fused_moe_nvfp4.
- `Int4Experts` (moe/expert_weights_int4.py): INT4 W4A16 experts (Kimi K2 Thinking / K2.5's compressed-tensors
  pack-quantized, GPTQ, AWQ): int32 words, group scales, optional uint8 zero points → kernels.fused_moe_int4.

Plan entries are `name -> PlanEntry(dest, index, source rows)` (moe/weight_plan.py, engine/rank/loader.py); `QuantizeOnLoad` as
the destination asks the loader to block-quantize a float checkpoint tensor into an FP8 weight and its scales.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from moelink.kernels.fp8 import FP8_DTYPE, block_scale_shape, reference_fused_moe_fp8
from moelink.kernels.moe import SILU
from moelink.kernels.mxfp4 import GROUP as MXFP4_GROUP
from moelink.kernels.nvfp4 import GROUP as NVFP4_GROUP, SCALE_DTYPE as NVFP4_SCALE_DTYPE
from .weight_plan import PlanEntry, Rearranged, WeightPlan

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


@dataclass(frozen=True)
class QuantizeOnLoad:
    """Loader destination: block-quantize the (float) checkpoint tensor, write the FP8 values to
    `weight[index]` (the plan entry's index) and its scales to `scale[scale_index]`."""

    weight: torch.Tensor
    scale: torch.Tensor
    scale_index: tuple
    block: tuple[int, int]


def scale_index(index: tuple, bn: int, what: str) -> tuple:
    """The index into a [..., Nb, Kb] scale tensor that matches `index` into its [..., N, K] weight: a slice
    of rows (the last entry, as stacked pieces are indexed) becomes the slice of block rows. A stacked piece
    must start on a block boundary, or its blocks would share scales with its neighbour (the holders place
    each piece so: models/linear.Linear's pieces, Fp8BlockExperts' up rows)."""
    if not index or not isinstance(index[-1], slice):
        return index
    rows = index[-1]
    start, stop = rows.start or 0, rows.stop
    if start % bn:
        raise ValueError(f"{what}: a stacked piece starts at row {start}, not a multiple of "
                         f"weight_block_size[0]={bn}, so its FP8 blocks would straddle two checkpoint tensors.")
    return (*index[:-1], slice(start // bn, -(-stop // bn)))


def fp8_plan(name: str, weight: torch.Tensor, scale: torch.Tensor, index: tuple, block: tuple[int, int],
             online: bool, rows: tuple = (), scale_rows: tuple | None = None) -> WeightPlan:
    """The plan entries of one FP8 weight (or a stacked piece of one) named `name` ("...q_proj.weight" or
    "...experts.gate_up_proj"): the weight and its `_scale_inv` tensor, or one QuantizeOnLoad entry when the
    checkpoint is float. `rows`: the checkpoint rows to read (experts of this rank, MLA's rope order);
    scale_rows: those of the scale tensor (default `rows`)."""
    s_index = scale_index(index, block[0], name)
    if online:
        return {name: PlanEntry(QuantizeOnLoad(weight, scale, s_index, block), index, rows)}
    scale_name = name[: -len(".weight")] + ".weight_scale_inv" if name.endswith(".weight") else name + "_scale_inv"
    s_rows = rows if scale_rows is None else scale_rows
    return {name: PlanEntry(weight, index, rows),
            scale_name: PlanEntry(scale, s_index, s_rows)}


def _param(*shape, dtype, device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class FloatExperts:
    """Expert weights in the model dtype (with gpt-oss's expert biases and activation when the layer has them)."""

    name = "float"
    supports_extras = True

    def create(self, layer: nn.Module, num_local: int, hidden: int, inter: int, dtype, device) -> None:
        layer.w13_EFD = _param(num_local, 2 * inter, hidden, dtype=dtype, device=device)
        layer.w2_EDI = _param(num_local, hidden, inter, dtype=dtype, device=device)

    def weight_plan(self, layer: nn.Module, m: str, fused: bool, expert_ids: list[int], rows: tuple,
                    names: tuple[str, str, str]) -> WeightPlan:
        """This rank's experts under `m` ("model.layers.{i}.mlp."): fused `experts.gate_up_proj` [E, 2I, D] /
        `experts.down_proj` [E, D, I] (rows = this rank's experts), or `experts.{e}.{gate,up,down}.weight`."""
        inter = layer.w2_EDI.shape[-1]
        if fused:
            return {m + "experts.gate_up_proj": PlanEntry(layer.w13_EFD, (), rows),
                    m + "experts.down_proj": PlanEntry(layer.w2_EDI, (), rows)}
        gate, up, down = names
        plan: WeightPlan = {}
        for local, e in enumerate(expert_ids):
            plan[f"{m}experts.{e}.{gate}.weight"] = PlanEntry(layer.w13_EFD, (local, slice(0, inter)))
            plan[f"{m}experts.{e}.{up}.weight"] = PlanEntry(layer.w13_EFD, (local, slice(inter, 2 * inter)))
            plan[f"{m}experts.{e}.{down}.weight"] = PlanEntry(layer.w2_EDI, (local,))
        return plan

    def run(self, kernels: Kernels, layer: nn.Module, x_ND, weights_NK, ids_NK) -> torch.Tensor:
        return kernels.fused_moe(x_ND, layer.w13_EFD, layer.w2_EDI, weights_NK, ids_NK, **layer._extras())


class Fp8BlockExperts:
    """FP8 e4m3 expert weights with float32 block scales (W8A8: the kernel quantizes activations per token
    per Bk channels). w13_EFD holds gate rows [0, I) and up rows [U, U + I), each piece with the blocks the
    checkpoint gave it (kernels/fp8.reference_fused_moe_fp8 reads U from the shapes):
    - `stacked` (the fused `experts.gate_up_proj` [E, 2I, D], quantized as one tensor by transformers'
      FP8Experts and `moelink quantize-fp8`; and every I that is a multiple of Bn, as in every published
      checkpoint: 2048 for DeepSeek-V3, 1408 for V2-Lite, 768 / 1536 for Qwen3): U = I, F = 2I.
    - else (per-expert gate_proj / up_proj, quantized apart, with an I that is not a multiple of Bn, e.g. 160
      or 96 at 128): U = I rounded up to Bn, so up starts on a block boundary with its own scale rows; rows
      I..U-1 are zeros the kernel never reads (it takes gate rows below I and up rows from U only)."""

    name = "fp8"
    supports_extras = False  # no published FP8 checkpoint has expert biases
    # Gated activations besides SiLU (the kernels' gate-up epilogue): Hunyuan Hy4-preview-FP8's clamped SwiGLU.
    activations = ("silu_clamp", "swiglu_oai")

    def __init__(self, block: tuple[int, int], online: bool = False, stacked: bool = False):
        self.block, self.online, self.stacked = (int(block[0]), int(block[1])), online, stacked

    def up_row(self, inter: int) -> int:
        """U: the first up row of w13 for an intermediate size `inter`."""
        bn = self.block[0]
        return inter if self.stacked else -(-inter // bn) * bn

    def create(self, layer: nn.Module, num_local: int, hidden: int, inter: int, dtype, device) -> None:
        rows = self.up_row(inter) + inter
        # Padding rows (U > I) start as zeros: never read by the kernel, but copied as they are by EPLB moves.
        make = torch.zeros if rows > 2 * inter else torch.empty
        layer.w13_EFD = nn.Parameter(make(num_local, rows, hidden, dtype=FP8_DTYPE, device=device), requires_grad=False)
        layer.w2_EDI = _param(num_local, hidden, inter, dtype=FP8_DTYPE, device=device)
        layer.w13_scale_inv_EFD = nn.Parameter(make(num_local, *block_scale_shape(rows, hidden, self.block),
                                                    dtype=torch.float32, device=device), requires_grad=False)
        layer.w2_scale_inv_EDI = _param(num_local, *block_scale_shape(hidden, inter, self.block),
                                        dtype=torch.float32, device=device)

    def weight_plan(self, layer: nn.Module, m: str, fused: bool, expert_ids: list[int], rows: tuple,
                    names: tuple[str, str, str]) -> WeightPlan:
        """FloatExperts' names, each with its scales (same expert rows) or quantized as it loads."""
        inter, b, on = layer.w2_EDI.shape[-1], self.block, self.online
        up = self.up_row(inter)
        w13, w2, s13, s2 = layer.w13_EFD, layer.w2_EDI, layer.w13_scale_inv_EFD, layer.w2_scale_inv_EDI
        if fused:
            if up != inter:
                raise ValueError(f"{m}experts.gate_up_proj: the layer was built for per-expert gate/up tensors "
                                 f"(up rows from {up}, moe_intermediate_size={inter}), not the fused layout.")
            return {**fp8_plan(m + "experts.gate_up_proj", w13, s13, (), b, on, rows),
                    **fp8_plan(m + "experts.down_proj", w2, s2, (), b, on, rows)}
        gate, up_name, down = names
        plan: WeightPlan = {}
        for local, e in enumerate(expert_ids):
            p = f"{m}experts.{e}."
            plan.update(fp8_plan(f"{p}{gate}.weight", w13, s13, (local, slice(0, inter)), b, on))
            plan.update(fp8_plan(f"{p}{up_name}.weight", w13, s13, (local, slice(up, up + inter)), b, on))
            plan.update(fp8_plan(f"{p}{down}.weight", w2, s2, (local,), b, on))
        return plan

    def run(self, kernels: Kernels, layer: nn.Module, x_ND, weights_NK, ids_NK) -> torch.Tensor:
        # A TritonKernels without the FP8 MoE kernel yet runs the reference (correct, slower).
        fused_moe_fp8 = getattr(kernels, "fused_moe_fp8", reference_fused_moe_fp8)
        act = {} if layer.activation == SILU else {"activation": layer.activation}  # plain SiLU: the call as before
        handoff = getattr(layer, "fp8_input", None)  # x quantized by the norm before (moe/fp8_input.py)
        x_fp8 = handoff.take(x_ND) if handoff is not None else None
        if x_fp8 is not None:
            act["x_fp8"] = x_fp8
        return fused_moe_fp8(x_ND, layer.w13_EFD, layer.w13_scale_inv_EFD, layer.w2_EDI, layer.w2_scale_inv_EDI,
                             weights_NK, ids_NK, block=self.block, **act)


def gate_up_order(inter: int) -> torch.Tensor:
    """The checkpoint row of each w13 row when gate and up are interleaved (gpt-oss: row 2i is gate channel i,
    row 2i+1 up channel i): [0, 2, ..., 2I-2, 1, 3, ..., 2I-1], so reading rows in this order gives [gate; up]."""
    return torch.cat([torch.arange(0, 2 * inter, 2), torch.arange(1, 2 * inter, 2)])


class Mxfp4Experts:
    """MXFP4 expert weights as gpt-oss publishes them (kernels/mxfp4.py: e2m1 pairs per byte, one E8M0 scale per
    32 along the reduction dim), with gpt-oss's expert biases and clamped SwiGLU: the fused layout
    `experts.{gate_up,down}_proj_{blocks,scales}` [E, N, K/32(, 16)] (output-channel major, gate/up rows
    interleaved) and `experts.{gate_up,down}_proj_bias`; or per expert as compressed-tensors writes them (Kimi K3:
    `_per_expert_plan`)."""

    name = "mxfp4"
    supports_extras = True
    whole_blocks = False  # set by weight_plan: the fused plan writes the blocks parameters whole

    def create(self, layer: nn.Module, num_local: int, hidden: int, inter: int, dtype, device) -> None:
        for field, n in (("hidden_size", hidden), ("intermediate_size", inter)):
            if n % MXFP4_GROUP:
                raise ValueError(f"config.json {field}={n} is not supported with MXFP4 experts: it must be a "
                                 f"multiple of {MXFP4_GROUP} (one E8M0 scale per {MXFP4_GROUP} values).")
        g, q = MXFP4_GROUP, MXFP4_GROUP // 2
        layer.w13_blocks_EFSQ = _param(num_local, 2 * inter, hidden // g, q, dtype=torch.uint8, device=device)
        layer.w13_scales_EFS = _param(num_local, 2 * inter, hidden // g, dtype=torch.uint8, device=device)
        layer.w2_blocks_EDSQ = _param(num_local, hidden, inter // g, q, dtype=torch.uint8, device=device)
        layer.w2_scales_EDS = _param(num_local, hidden, inter // g, dtype=torch.uint8, device=device)

    def weight_plan(self, layer: nn.Module, m: str, fused: bool, expert_ids: list[int], rows: tuple,
                    names: tuple[str, str, str]) -> WeightPlan:
        """This rank's experts (and their biases, when the layer has them) under `m` ("model.layers.{i}.mlp.").

        Each gate_up tensor is read through one advanced index (the loader's checkpoint-index element): with e
        [E', 1] this rank's experts and f [1, 2I] = gate_up_order, t[e, f] is [E', 2I, ...] with [gate; up]
        rows. Permuting whole rows is exact for blocks, scales and bias alike: a row carries its own bytes and
        scales (kernels/mxfp4.py). down tensors are read at rows e. `rows` is the fused reader's expert index
        (`()` all, a slice for a contiguous run, else the ids as a tensor): a slice stays a slice (basic
        indexing beside the advanced row order), so the loader reads only this rank's experts from the file."""
        # Whether the plan writes each blocks parameter whole, so that a weight update's written ids name it: where
        # it does, the layer may hold the blocks in the decode's pair order (MoELayer.process_weights_after_loading
        # permutes what was written); the per-expert plan writes views, and the blocks keep the published order.
        self.whole_blocks = fused
        if not fused:
            return self._per_expert_plan(layer, m, expert_ids, names)
        f = gate_up_order(layer.w2_blocks_EDSQ.shape[2] * MXFP4_GROUP)
        if rows and not isinstance(rows[0], slice):
            e = torch.as_tensor(rows[0], dtype=torch.long)
            gu, dn = (e[:, None], f[None, :]), (e,)
        else:
            gu, dn = (rows[0] if rows else slice(None), f), rows
        x = m + "experts."
        plan: WeightPlan = {x + "gate_up_proj_blocks": PlanEntry(layer.w13_blocks_EFSQ, (), gu),
                                  x + "gate_up_proj_scales": PlanEntry(layer.w13_scales_EFS, (), gu),
                                  x + "down_proj_blocks": PlanEntry(layer.w2_blocks_EDSQ, (), dn),
                                  x + "down_proj_scales": PlanEntry(layer.w2_scales_EDS, (), dn)}
        if getattr(layer, "b13_EF", None) is not None:
            plan[x + "gate_up_proj_bias"] = PlanEntry(layer.b13_EF, (), gu)
        if getattr(layer, "b2_ED", None) is not None:
            plan[x + "down_proj_bias"] = PlanEntry(layer.b2_ED, (), dn)
        return plan

    @staticmethod
    def _per_expert_plan(layer: nn.Module, m: str, expert_ids: list[int], names: tuple[str, str, str]) -> WeightPlan:
        """compressed-tensors' per-expert layout (Kimi K3's `mxfp4-pack-quantized`): `experts.{e}.{name}.weight_packed`
        uint8 [N, K/2] (two e2m1 values a byte, low nibble first, as gpt-oss's blocks) and `weight_scale` E8M0 uint8
        [N, K/32]; the gate's rows fill w13's first I rows, the up's the next I, without interleaving."""
        inter = layer.w2_blocks_EDSQ.shape[2] * MXFP4_GROUP
        plan: WeightPlan = {}
        for j, e in enumerate(expert_ids):
            x = f"{m}experts.{e}."
            for name, blocks, scales in ((names[0], layer.w13_blocks_EFSQ[j, :inter], layer.w13_scales_EFS[j, :inter]),
                                         (names[1], layer.w13_blocks_EFSQ[j, inter:], layer.w13_scales_EFS[j, inter:]),
                                         (names[2], layer.w2_blocks_EDSQ[j], layer.w2_scales_EDS[j])):
                n, s, q = blocks.shape
                plan[f"{x}{name}.weight_packed"] = PlanEntry(Rearranged(
                    blocks, lambda t, s=s, q=q: t.reshape(t.shape[0], s, q), ((n, s * q), torch.uint8)), ())
                plan[f"{x}{name}.weight_scale"] = PlanEntry(scales, ())
        return plan

    def run(self, kernels: Kernels, layer: nn.Module, x_ND, weights_NK, ids_NK) -> torch.Tensor:
        # Blocks permuted after load into the Triton decode's pair order (MoELayer.process_weights_after_loading)
        pairs = {"pair_order": True} if getattr(layer, "mxfp4_pair_order", False) else {}
        return kernels.fused_moe_mxfp4(x_ND, layer.w13_blocks_EFSQ, layer.w13_scales_EFS, layer.w2_blocks_EDSQ,
                                       layer.w2_scales_EDS, weights_NK, ids_NK, **layer._extras(), **pairs)


class Nvfp4Experts:
    """NVFP4 expert weights as ModelOpt exports them (kernels/nvfp4.py): per expert, each of gate_proj / up_proj /
    down_proj holds `weight` (uint8 [N, K/2]), `weight_scale` (float8_e4m3fn [N, K/16]), `weight_scale_2` and
    `input_scale` (float32 scalars). The loader copies each expert's gate and up rows into w13's two halves and
    their global scales into column 0 / 1 of `w13_scale2_E2`, so unequal gate and up globals stay exact (the
    kernels scale each half's accumulator by its own). `input_scale` is loaded into `w13_input_scale_E2` /
    `w2_input_scale_E` and not applied: moelink runs W4A16 (activations stay in the model dtype)."""

    name = "nvfp4"
    supports_extras = False  # no published NVFP4 MoE checkpoint has expert biases or a clamped SwiGLU

    def create(self, layer: nn.Module, num_local: int, hidden: int, inter: int, dtype, device) -> None:
        for field, n in (("hidden_size", hidden), ("moe_intermediate_size", inter)):
            if n % NVFP4_GROUP:
                raise ValueError(f"config.json {field}={n} is not supported with NVFP4 experts: it must be a "
                                 f"multiple of {NVFP4_GROUP} (one e4m3 scale per {NVFP4_GROUP} values).")
        g, f32 = NVFP4_GROUP, torch.float32
        layer.w13_q_EFB = _param(num_local, 2 * inter, hidden // 2, dtype=torch.uint8, device=device)
        layer.w13_scale_EFS = _param(num_local, 2 * inter, hidden // g, dtype=NVFP4_SCALE_DTYPE, device=device)
        layer.w13_scale2_E2 = _param(num_local, 2, dtype=f32, device=device)
        layer.w13_input_scale_E2 = _param(num_local, 2, dtype=f32, device=device)
        layer.w2_q_EDB = _param(num_local, hidden, inter // 2, dtype=torch.uint8, device=device)
        layer.w2_scale_EDS = _param(num_local, hidden, inter // g, dtype=NVFP4_SCALE_DTYPE, device=device)
        layer.w2_scale2_E = _param(num_local, dtype=f32, device=device)
        layer.w2_input_scale_E = _param(num_local, dtype=f32, device=device)

    def weight_plan(self, layer: nn.Module, m: str, fused: bool, expert_ids: list[int], rows: tuple,
                    names: tuple[str, str, str]) -> WeightPlan:
        """This rank's experts under `m` ("model.layers.{i}.mlp."): `experts.{e}.{gate,up,down}.{weight,
        weight_scale, weight_scale_2, input_scale}`, ModelOpt's per-expert names (the only layout it exports)."""
        if fused:
            raise ValueError(f"NVFP4 experts under {m!r} must be stored per expert (experts.{{e}}.gate_proj.weight "
                             "...), as ModelOpt exports them: fused NVFP4 expert tensors are not a published layout.")
        inter = layer.w13_q_EFB.shape[1] // 2
        gate, up, down = names
        plan: WeightPlan = {}
        for local, e in enumerate(expert_ids):
            for name, rows_, half in ((gate, slice(0, inter), 0), (up, slice(inter, 2 * inter), 1)):
                p = f"{m}experts.{e}.{name}."
                plan[p + "weight"] = PlanEntry(layer.w13_q_EFB, (local, rows_))
                plan[p + "weight_scale"] = PlanEntry(layer.w13_scale_EFS, (local, rows_))
                plan[p + "weight_scale_2"] = PlanEntry(layer.w13_scale2_E2, (local, half))
                plan[p + "input_scale"] = PlanEntry(layer.w13_input_scale_E2, (local, half))
            p = f"{m}experts.{e}.{down}."
            plan[p + "weight"] = PlanEntry(layer.w2_q_EDB, (local,))
            plan[p + "weight_scale"] = PlanEntry(layer.w2_scale_EDS, (local,))
            plan[p + "weight_scale_2"] = PlanEntry(layer.w2_scale2_E, (local,))
            plan[p + "input_scale"] = PlanEntry(layer.w2_input_scale_E, (local,))
        return plan

    def run(self, kernels: Kernels, layer: nn.Module, x_ND, weights_NK, ids_NK) -> torch.Tensor:
        return kernels.fused_moe_nvfp4(x_ND, layer.w13_q_EFB, layer.w13_scale_EFS, layer.w13_scale2_E2,
                                       layer.w2_q_EDB, layer.w2_scale_EDS, layer.w2_scale2_E, weights_NK, ids_NK)


from .expert_weights_int4 import Int4Experts, int4_format  # noqa: E402  (INT4 W4A16: its own module)


ExpertFormat = FloatExperts | Fp8BlockExperts | Mxfp4Experts | Nvfp4Experts | Int4Experts


def make_expert_format(quant, fused: bool = False) -> ExpertFormat:
    """The expert format of a model's quantization (engine/config/quantization.py's config; None = float); `fused`: the
    checkpoint holds this layer's experts fused (`experts.gate_up_proj`), which FP8 keeps stacked."""
    if quant is None:
        return FloatExperts()
    if quant.method == "fp8":
        return Fp8BlockExperts(quant.block, quant.online, stacked=fused)
    if quant.method == "mxfp4":
        return Mxfp4Experts()
    if quant.method == "nvfp4":
        return Nvfp4Experts()
    if quant.method == "int4":
        return int4_format(quant)
    raise ValueError(f"quantization {quant.method!r} has no expert weight format (moelink runs fp8, mxfp4, nvfp4 and "
                     f"int4).")
