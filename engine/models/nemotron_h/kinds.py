"""Nemotron-H's block kinds (engine/models/blocks/registry.py imports this module): the residual kind "nemotron_h"
(one mixer layer and the FFN layer after it, or the mixer alone: reader.layer_pairs), the FFN kind "nemotron_h"
(the routed relu^2 experts, through the latent projections where moe_latent_size is set, beside the relu^2 shared
expert) with the relu^2 MLP of the "mlp" layers, and the checkpoint kind "nemotron_h" (the `backbone.` names).

The experts have no gate: each one's up_proj is loaded into the up rows of the layer's w13 [E, 2I, D] and the gate
rows stay zero, the activation "relu2" (kernels.moe.MoEActivation; the Triton epilogue's ACT 3) reading the up half
alone, so every fused MoE of the float experts runs them as they are; they hold I x D zeros per expert (and the
gate-up GEMM computes the gate half it does not read).

Legend: T tokens, D hidden, L latent (moe_latent_size), I an MLP's width, G experts.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from moelink.kernels.moe import MoEActivation
from moelink.moe.expert_weights import make_expert_format
from moelink.moe.layer import MoELayer, Stages
from moelink.moe.router import make_router
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.attention import AttentionKind
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, converted
from ..blocks.context import BuildContext
from ..blocks.ffn import FFN, FFNBlock, SharedExpertsMoE, TokenSlice
from ..blocks.stream import RESIDUAL, PreNormLayer, StreamState, prenorm
from ..layers import ForwardContext
from ..linear import FloatLinear, Linear
from .reader import hf_kinds, layer_pairs

RELU2 = MoEActivation("relu2")


class Relu2MLP(nn.Module):
    """down(relu(up(x))^2): transformers' NemotronHMLP (the "mlp" layers and the shared expert), no gate."""

    def __init__(self, hidden_size: int, intermediate_size: int, kernels, dtype, device=None):
        super().__init__()
        self.up_proj = Linear(hidden_size, intermediate_size, FloatLinear(), kernels, dtype, device)
        self.down_proj = Linear(intermediate_size, hidden_size, FloatLinear(), kernels, dtype, device)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.relu(self.up_proj(x_TD)).square())

    def forward_add(self, x_TD: torch.Tensor, addend_TD: torch.Tensor) -> torch.Tensor:
        return self.forward(x_TD) + addend_TD

    def weight_plan(self, p: str) -> WeightPlan:
        return {**self.up_proj.weight_plan(p + "up_proj.weight"), **self.down_proj.weight_plan(p + "down_proj.weight")}


class LatentMoELayer(MoELayer):
    """MoELayer whose experts are L wide: the router reads x [T, D] (gate_GD [G, D]), the experts fc1_latent_proj(x)
    [T, L] (what crosses under expert parallelism), their weighted sum goes through fc2_latent_proj back to D."""

    def __init__(self, hidden_size: int, latent: int, intermediate_size: int, num_experts: int, router, kernels,
                 dtype, device, **kw):
        super().__init__(latent, intermediate_size, num_experts, router, kernels, dtype, device, **kw)
        self.gate_GD = nn.Parameter(torch.empty(self.gate_GD.shape[0], hidden_size, dtype=self.gate_GD.dtype,
                                                device=device), requires_grad=False)
        self.fc1_latent_proj = Linear(hidden_size, latent, FloatLinear(), kernels, dtype, device)
        self.fc2_latent_proj = Linear(latent, hidden_size, FloatLinear(), kernels, dtype, device)

    def stages(self, x_TD: torch.Tensor, route_TX: torch.Tensor | None = None) -> Stages:
        y_TL = yield from super().stages(self.fc1_latent_proj(x_TD), route_TX=x_TD)
        return self.fc2_latent_proj(y_TL)


def _fused_name(names: frozenset[str], p: str) -> bool:
    """Whether the checkpoint holds this layer's experts fused (transformers 5's mixer.experts.up_proj [E, I, X]),
    under backbone. or model."""
    rest = p[len("model."):] + "mixer.experts.up_proj"
    return "backbone." + rest in names or "model." + rest in names


@FFN.register("nemotron_h")
class NemotronHMoE(FFNBlock):
    """The "moe" layer: routed relu^2 experts (latent where moe_latent_size is set) + the relu^2 shared expert on x
    (`mlp`: SharedExpertsMoE around the MoELayer)."""

    def __init__(self, ctx: BuildContext, i: int):
        cfg, m = ctx.cfg, ctx.cfg.moe
        if ctx.tp is not None:  # every Nemotron-H has Mamba2 layers: engine/config/tensor_parallel.py refuses TP first
            raise ValueError(f"tensor parallelism is not supported for {cfg.architecture} yet.")
        latent = (cfg.hf_config or {}).get("moe_latent_size")
        kernels = ctx.kernels
        kw = dict(ep=ctx.ep, moe_index=ctx.moe_row(i), stats=ctx.stats, expert_format=make_expert_format(None, False),
                  activation=RELU2)
        E, inter = cfg.num_experts, cfg.moe_intermediate_size
        self.moe = (LatentMoELayer(cfg.hidden_size, int(latent), inter, E, make_router(m.router), kernels, cfg.dtype,
                                   ctx.device, **kw) if latent is not None else
                    MoELayer(cfg.hidden_size, inter, E, make_router(m.router), kernels, cfg.dtype, ctx.device, **kw))
        with torch.no_grad():
            self.moe.w13_EFD[:, :inter].zero_()  # the gate rows: never loaded, never read (RELU2)
        shared = Relu2MLP(cfg.hidden_size, m.shared_expert_intermediate_size, ctx.kernels, cfg.dtype, ctx.device)
        self.mlp = self.shared_moe = SharedExpertsMoE(self.moe, shared)
        self.modules = {"moe": self.moe, "mlp": self.mlp}

    def stages(self, h_TD: torch.Tensor, input_ids_T: torch.Tensor | None) -> Stages:
        return (yield from self.mlp.stages(h_TD))

    def sliced(self, input_ids_T: torch.Tensor | None, tp) -> TokenSlice:
        return self.mlp

    def moe_only_stages(self, x_0D: torch.Tensor) -> Stages:
        return (yield from self.moe.stages(x_0D))

    @property
    def refuses_padding_rows(self) -> bool:
        return self.moe.ep is not None and not self.moe.ep.all_to_all.accepts_padding_rows

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        """Under `p` ("model.layers.{k}.", k the checkpoint's FFN layer): mixer.gate (+ its correction bias), this
        rank's experts' up_proj into w13's up rows and down_proj, per expert or fused, the latent projections, the
        shared expert."""
        moe, m = self.moe, p + "mixer."
        inter = moe.w2_EDI.shape[-1]
        up = slice(inter, 2 * inter)
        plan: WeightPlan = {m + "gate.weight": PlanEntry(moe.gate_GD, ())}
        if moe.e_score_correction_bias_G is not None:
            plan[m + "gate.e_score_correction_bias"] = PlanEntry(moe.e_score_correction_bias_G, ())
        if _fused_name(names, p):
            rows: tuple = (() if expert_ids == list(range(cfg.num_experts))
                           else (torch.tensor(expert_ids, dtype=torch.long),))
            plan[m + "experts.up_proj"] = PlanEntry(moe.w13_EFD, (slice(None), up), rows)
            plan[m + "experts.down_proj"] = PlanEntry(moe.w2_EDI, (), rows)
        else:
            for local, e in enumerate(expert_ids):
                plan[f"{m}experts.{e}.up_proj.weight"] = PlanEntry(moe.w13_EFD, (local, up))
                plan[f"{m}experts.{e}.down_proj.weight"] = PlanEntry(moe.w2_EDI, (local,))
        if isinstance(moe, LatentMoELayer):
            plan.update(moe.fc1_latent_proj.weight_plan(m + "fc1_latent_proj.weight"))
            plan.update(moe.fc2_latent_proj.weight_plan(m + "fc2_latent_proj.weight"))
        plan.update(self.shared_moe.shared.weight_plan(m + "shared_experts."))
        return plan


class _MLP(FFNBlock):
    """The "mlp" layer: one relu^2 MLP of intermediate_size."""

    def __init__(self, ctx: BuildContext, i: int):
        cfg = ctx.cfg
        self.mlp = Relu2MLP(cfg.hidden_size, cfg.intermediate_size, ctx.kernels, cfg.dtype, ctx.device)
        self.modules = {"mlp": self.mlp}

    def stages(self, h_TD: torch.Tensor, input_ids_T: torch.Tensor | None) -> Stages:
        return self.mlp(h_TD)  # never yields
        yield

    def weight_plan(self, p, layer_idx, cfg, spec, expert_ids, names) -> WeightPlan:
        return self.mlp.weight_plan(p + "mixer.")


class _NoFFN(FFNBlock):
    """An engine layer whose mixer layer is followed by another mixer layer: nothing after the mixer."""

    def __init__(self, ctx: BuildContext, i: int):
        self.modules = {}

    def stages(self, h_TD: torch.Tensor, input_ids_T: torch.Tensor | None) -> Stages:
        raise TypeError("an engine layer without an FFN runs none")
        yield

    def weight_plan(self, p, layer_idx, cfg, spec, expert_ids, names) -> WeightPlan:
        return {}


def pairs_of(cfg: ModelConfig) -> tuple[tuple[int, int | None], ...]:
    return layer_pairs(hf_kinds(cfg.hf_config or {}))


@RESIDUAL.register("nemotron_h")
class NemotronHLayer(PreNormLayer):
    """Engine layer j: checkpoint layer `mixer_layer` (its norm the input_layernorm, its mixer) and, where there is
    one, the FFN layer after it (its norm the post_attention_layernorm, its FFN: reader.layer_pairs)."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        pairs = pairs_of(ctx.cfg)
        if len(pairs) != ctx.cfg.num_layers:
            raise ValueError(f"{ctx.cfg.architecture}: layers_block_type pairs into {len(pairs)} layers, its "
                             f"ModelConfig holds {ctx.cfg.num_layers}.")
        self.mixer_layer, self.ffn_layer = pairs[i]
        kind = hf_kinds(ctx.cfg.hf_config)[self.ffn_layer] if self.ffn_layer is not None else None
        own = NemotronHMoE if kind == "moe" else _MLP if kind == "mlp" else _NoFFN
        super().__init__(ctx, i, attention, attn_cfg, own)
        if kind is None:
            self.post_attention_layernorm = None

    def stages(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        if self.ffn_layer is not None:
            return (yield from super().stages(positions_T, state, input_ids_T, ctx))
        x_TD, residual_TD = state
        h_TD, residual_TD = prenorm(self.input_layernorm, x_TD, residual_TD)
        return self.mixer(positions_T, h_TD, ctx), residual_TD

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        """Under the checkpoint's own layer indices (model.layers.{k}.; the checkpoint kind puts backbone. first)."""
        q = f"model.layers.{self.mixer_layer}."
        plan: WeightPlan = {**self.input_layernorm.weight_plan(q + "norm.weight"),
                            **self.mixer.weight_plan(q + "mixer.")}
        if self.ffn_layer is not None:
            f = f"model.layers.{self.ffn_layer}."
            plan.update(self.post_attention_layernorm.weight_plan(f + "norm.weight"))
            plan.update(self.ffn.weight_plan(f, layer_idx, cfg, spec, expert_ids, names))
        return plan


def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    """The model's plan under the checkpoint's names: backbone.embeddings / backbone.norm_f / backbone.layers.* as
    published (and as save_pretrained writes them), or model.* where the checkpoint holds transformers 5's names."""
    prefix = "model." if "model.embeddings.weight" in names else "backbone."
    out: WeightPlan = {}
    for name, entry in plan.items():
        if name == "model.embed_tokens.weight":
            name = prefix + "embeddings.weight"
        elif name == "model.norm.weight":
            name = prefix + "norm_f.weight"
        elif name.startswith("model."):
            name = prefix + name[len("model."):]
        out[name] = entry
    return out


CHECKPOINT.add("nemotron_h", CheckpointKind(_plan, converted))

__all__ = ["LatentMoELayer", "NemotronHLayer", "NemotronHMoE", "RELU2", "Relu2MLP"]
