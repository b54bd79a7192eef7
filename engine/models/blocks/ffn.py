"""FFN kinds, the block after attention: "dense" (layers outside `sparse_layers`: Qwen3's mlp_only_layers,
DeepSeek / GLM's first_k_dense_replace), "routed" (moe.MoELayer: a learned router's top-k), "routed_shared"
(routed + always-on shared experts: SharedExpertsMoE, when n_shared_experts > 0). A family adds its own
(DeepSeek-V4's "token_routed": engine/models/deepseek_v4/blocks.py).

An FFNBlock is not a module: it names the modules it installs on the layer (`modules`, under their checkpoint
names, so a layer's parameters are named as before) and says how to run and load them. Under tensor parallelism
`ffn_stages` runs a routed block one of the two ways of engine/tp/experts.py.

Legend: T tokens, D hidden, E experts.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Protocol

import torch
from torch import nn

from moelink.kernels.moe import MoEActivation
from moelink.kernels.situ import SiTU
from moelink.moe.expert_weights import gate_up_order, make_expert_format
from moelink.moe.layer import MoELayer, Stages, run_stages
from moelink.moe.router import make_router
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ...tp.experts import ExpertShard, token_sliced_stages
from ...tp.group import TensorParallel
from ..layers import DenseMLP
from .context import BuildContext
from .registry import Registry


class SharedExpertsMoE(nn.Module):
    """Routed experts plus always-on shared experts (DeepSeek, GLM): out = routed(x) + shared(x), as
    transformers adds them. The shared MLP runs on this rank's own tokens, so under expert parallelism every
    rank holds it and it never crosses the all-to-all; only routed experts are placed, dispatched, counted."""

    def __init__(self, routed: MoELayer, shared: DenseMLP, gate_D: torch.Tensor | None = None):
        """gate_D: Qwen3-Next's shared_expert_gate ([D]): the shared MLP's output is scaled by sigmoid(x . gate)
        per token before the sum; None: added as it is."""
        super().__init__()
        self.routed, self.shared = routed, shared
        self.gate_D = gate_D

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return run_stages(self.stages(x_TD))

    def stages(self, x_TD: torch.Tensor) -> Stages:
        """The routed layer's stages with the shared MLP run while the dispatch is in flight (its one
        independent piece of work); the sum is routed + shared, as before (without a dispatch, and without a
        shared gate, the add inside the shared MLP's down-projection launch: DenseMLP.forward_add)."""
        plus = None if self.gate_D is not None else (lambda routed_TD: self.shared.forward_add(x_TD, routed_TD))
        return overlapped(self.routed.stages(x_TD), lambda: self._shared(x_TD), plus)

    def _shared(self, x_TD: torch.Tensor) -> torch.Tensor:
        shared_TD = self.shared(x_TD)
        if self.gate_D is not None:
            shared_TD = torch.sigmoid(x_TD @ self.gate_D)[:, None] * shared_TD
        return shared_TD


def overlapped(routed: Stages, shared: Callable[[], torch.Tensor],
               shared_plus: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Stages:
    """routed + shared, `shared()` computed while the routed block's dispatch is in flight (expert parallelism;
    without it nothing travels and the routed block returns at once, and `shared_plus(routed)`, where given, is the
    sum: the shared MLP adding it in its own last launch)."""
    try:
        next(routed)  # router run, dispatch issued
    except StopIteration as done:  # no expert parallelism: nothing travels
        return (done.value + shared()) if shared_plus is None else shared_plus(done.value)
    shared_TD = shared()
    yield  # dispatch in flight (the shared MLP above ran during it)
    routed_TD = yield from routed
    return routed_TD + shared_TD


class TokenSlice(Protocol):
    """What a routed block runs on this rank's token slice under TP with EP (engine/tp/experts.token_sliced_stages):
    its MoE layer, or the layer with what else the block needs (shared experts, the slice's token ids)."""

    def stages(self, h_tD: torch.Tensor) -> Stages: ...


class FFNBlock(ABC):
    """One layer's FFN block. `modules`: what the layer holds, by attribute name, in registration order.
    `moe`: its routed experts (None in a dense layer): expert parallelism, valid rows and the counters act on them.
    `expert_shard`: the experts split over a TP group by channels (engine/tp/experts.py), else None."""

    modules: dict[str, nn.Module]
    # A MoELayer, or a family's subclass whose stages take more (DeepSeek-V4's TokenRoutedMoELayer: the token ids):
    # typed loosely so that a family's block calls its own layer's stages without a cast.
    moe: Any = None
    expert_shard: ExpertShard | None = None

    @abstractmethod
    def stages(self, h_TD: torch.Tensor, input_ids_T: torch.Tensor | None) -> Stages:
        """The block on h's rows (their token ids beside them, for the kinds that route by them)."""

    def sliced(self, input_ids_T: torch.Tensor | None, tp: TensorParallel) -> TokenSlice:
        """What token_sliced_stages runs on this rank's token slice. Only a block
        with routed experts is sliced (ffn_stages asks for it when `moe` is set)."""
        raise TypeError(f"{type(self).__name__} has no routed experts: it is never run token-sliced.")

    def moe_only_stages(self, x_0D: torch.Tensor) -> Stages:
        """An empty micro-batch under EP: the routed experts' dispatch and combine, no tokens. Only a block with
        routed experts has them."""
        raise TypeError(f"{type(self).__name__} has no routed experts: no dispatch to join.")

    @property
    def refuses_padding_rows(self) -> bool:
        """Padded rows (set_valid_rows) cannot be dispatched by this block's all-to-all."""
        return False

    @abstractmethod
    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        """Checkpoint names under the layer's prefix `p` ("model.layers.{i}.")."""


def ffn_stages(block: FFNBlock, tp: TensorParallel | None, h_TD: torch.Tensor,
               input_ids_T: torch.Tensor | None) -> Stages:
    """The block as the layer runs it: whole without TP (or dense: its linears split themselves); under TP with
    the experts split by channels, every token through this rank's channels and one all-reduce; with the experts
    in EP, this rank's token slice through the block, the slices all-gathered."""
    if tp is None or block.moe is None:
        return (yield from block.stages(h_TD, input_ids_T))
    if block.expert_shard is not None:  # every token, this rank's channels of every expert: one all-reduce
        return tp.all_reduce((yield from block.stages(h_TD, input_ids_T)))
    return (yield from token_sliced_stages(tp, block.moe, block.sliced(input_ids_T, tp), h_TD))


FFN: Registry[Callable[[BuildContext, int], FFNBlock]] = Registry("ffn")


@FFN.register("dense")
class DenseFFN(FFNBlock):
    def __init__(self, ctx: BuildContext, i: int):
        cfg = ctx.cfg
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.dtype, ctx.device, kernels=ctx.kernels,
                            quant=cfg.quantization, prefix=f"model.layers.{i}.mlp.", tp=ctx.tp,
                            activation=dense_activation(cfg))
        self.modules = {"mlp": self.mlp}

    def stages(self, h_TD: torch.Tensor, input_ids_T: torch.Tensor | None) -> Stages:
        return self.mlp(h_TD)  # never yields
        yield  # a generator all the same

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        return self.mlp.weight_plan(p + "mlp.")


@FFN.register("routed")
class RoutedFFN(FFNBlock):
    """The routed experts alone (`mlp` is the MoELayer)."""

    def __init__(self, ctx: BuildContext, i: int):
        cfg, tp, quant, m = ctx.cfg, ctx.tp, ctx.cfg.quantization, ctx.cfg.moe
        experts = f"model.layers.{i}.{ctx.spec.moe_prefix}.experts"
        # The checkpoint holds this layer's experts fused (experts.gate_up_proj): that decides how FP8 experts lay
        # out their gate and up blocks (moe/expert_weights.Fp8BlockExperts).
        fmt = make_expert_format(quant if quant is None or quant.is_quantized(experts) else None,
                                 fused_experts_name(i) in ctx.names)
        # Under TP without EP (ep None) each rank holds every expert's 1/N of the intermediate channels
        # (engine/tp/experts.py); with EP the experts are placed whole and the block runs on token slices.
        self.expert_shard = ExpertShard(tp, cfg.moe_intermediate_size) if tp and ctx.ep is None else None
        inter = self.expert_shard.w if self.expert_shard else cfg.moe_intermediate_size
        self.moe = MoELayer(cfg.hidden_size, inter, cfg.num_experts, make_router(m.router),
                            ctx.kernels, cfg.dtype, ctx.device, ep=ctx.ep, moe_index=ctx.moe_row(i),
                            stats=ctx.stats, expert_format=fmt, router_bias=m.router_bias, expert_bias=m.expert_bias,
                            activation=moe_activation(m, m.activation),
                            zero_experts=m.zero_experts, weight_on_input=m.router_weight_on_input)
        if self.expert_shard and self.moe.b2_ED is not None:
            self.moe.b2_ED.zero_()  # gpt-oss's down bias: the group's first rank loads it, the others add none
        if self.expert_shard and self.expert_shard.rank:
            self.moe.identity_share = 0.0  # zero-computation experts' tokens: added once over the all-reduce
        self.mlp: nn.Module = self.moe
        self.modules = {"moe": self.moe, "mlp": self.mlp}

    def stages(self, h_TD: torch.Tensor, input_ids_T: torch.Tensor | None) -> Stages:
        return (yield from self.mlp.stages(h_TD))  # MoELayer / SharedExpertsMoE

    def sliced(self, input_ids_T: torch.Tensor | None, tp: TensorParallel) -> TokenSlice:
        return self.mlp  # MoELayer / SharedExpertsMoE

    def moe_only_stages(self, x_0D: torch.Tensor) -> Stages:
        return (yield from self.moe.stages(x_0D))

    @property
    def refuses_padding_rows(self) -> bool:
        # The counted backends look every id up in the placement tables; -1 has no rank to go to.
        return self.moe.ep is not None and not self.moe.ep.all_to_all.accepts_padding_rows

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        """The router and this rank's experts (`expert_ids`), in the layer's layout per `names`
        (MoEDecoderForCausalLM.weight_plan)."""
        shard, plan = self.expert_shard, {}
        if spec.expert_layout == "gpt_oss":
            plan.update(_gpt_oss_plan(self.moe, f"{p}{spec.moe_prefix}.", cfg, spec, expert_ids))
            if shard is not None:
                plan.update(shard.gpt_oss_plan(self.moe, f"{p}{spec.moe_prefix}.", cfg.hidden_size))
                if shard.rank:  # the down bias once per group (the others' stay zero)
                    plan.pop(f"{p}{spec.moe_prefix}.experts.down_proj_bias")
            return plan
        fused = fused_experts_name(layer_idx) in names
        prefix = p + ("mlp." if fused else spec.moe_prefix + ".")
        plan.update(_expert_plan(self.moe, prefix, fused, cfg, spec, expert_ids))
        if shard is not None:  # the same names, this rank's channels
            plan.update(shard.plan(self.moe, prefix, fused, expert_ids, spec.expert_names))
        return plan


@FFN.register("routed_shared")
class RoutedSharedFFN(RoutedFFN):
    """Routed + shared experts (`mlp` is the SharedExpertsMoE around the MoELayer)."""

    def __init__(self, ctx: BuildContext, i: int):
        super().__init__(ctx, i)
        cfg, m = ctx.cfg, ctx.cfg.moe
        shared_size = m.shared_expert_intermediate_size or cfg.moe_intermediate_size * m.n_shared_experts
        gate = (nn.Parameter(torch.empty(cfg.hidden_size, dtype=cfg.dtype, device=ctx.device), requires_grad=False)
                if m.shared_expert_gate else None)
        # Shared experts split like the routed ones (their partial sum all-reduced with the routed one's).
        split: dict = dict(tp=ctx.tp, reduce=False) if self.expert_shard else {}
        self.mlp = self.shared_moe = SharedExpertsMoE(self.moe, DenseMLP(
            cfg.hidden_size, shared_size, cfg.dtype, ctx.device, kernels=ctx.kernels, quant=cfg.quantization,
            prefix=f"model.layers.{i}.{ctx.spec.moe_prefix}.{ctx.spec.shared_experts}.",
            activation=dense_activation(cfg), **split), gate)
        self.modules = {"moe": self.moe, "mlp": self.mlp}

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan = super().weight_plan(p, layer_idx, cfg, spec, expert_ids, names)
        if spec.expert_layout == "gpt_oss":
            return plan
        # every rank holds the shared experts whole
        plan.update(self.shared_moe.shared.weight_plan(f"{p}{spec.moe_prefix}.{spec.shared_experts}."))
        if self.shared_moe.gate_D is not None:  # [1, D] on disk
            plan[f"{p}{spec.moe_prefix}.{spec.shared_experts}_gate.weight"] = PlanEntry(self.shared_moe.gate_D, (),
                                                                                        (0,))
        return plan


def dense_activation(cfg: ModelConfig) -> MoEActivation | None:
    """The dense MLPs' gated activation when it is not SiLU (MoEConfig.dense_activation), else None."""
    m = cfg.moe
    if m is None or m.dense_activation == "silu":
        return None
    return moe_activation(m, m.dense_activation)


def moe_activation(m, kind: str) -> MoEActivation:
    """The gated activation `kind` with the MoEConfig `m`'s constants (SiTU's, or the clamped SwiGLUs')."""
    if kind == "situ":
        return SiTU(beta=m.situ_beta, linear_beta=m.situ_linear_beta)
    return MoEActivation(kind, m.swiglu_alpha, m.swiglu_limit)


def ffn_kind(cfg: ModelConfig, spec: ArchSpec, layer_idx: int) -> str:
    """The FFN kind of a layer: dense outside `sparse_layers`; else the architecture's own (ArchSpec.ffn), or
    routed experts with shared ones where the config has them."""
    if layer_idx not in cfg.sparse_layers:
        return "dense"
    if spec.ffn:
        return spec.ffn
    return "routed_shared" if cfg.moe.n_shared_experts else "routed"


def _expert_plan(mlp: MoELayer, m: str, fused: bool, cfg: ModelConfig, spec: ArchSpec,
                 expert_ids: list[int]) -> WeightPlan:
    """The router and this rank's experts of one MoE layer whose checkpoint names start with `m`.

    Experts come in one of two on-disk layouts: per expert, as Hugging Face publishes them and `save_pretrained`
    writes them by default (`{moe_prefix}.experts.{e}.{expert_names}.weight`); fused, as transformers 5 holds them in
    memory and writes them with `save_pretrained(save_original_format=False)`: `mlp.experts.gate_up_proj` [E, 2I, D]
    (gate rows, then up rows: our w13 order) and `mlp.experts.down_proj` [E, D, I], with the router at `mlp.gate`."""
    plan: WeightPlan = {m + f"{spec.router}.weight": PlanEntry(mlp.gate_GD, ())}
    if mlp.e_score_correction_bias_G is not None:
        plan[m + spec.correction_bias] = PlanEntry(mlp.e_score_correction_bias_G, ())
    # The expert format lists its weights (and scales) for this rank's experts, in either layout.
    rows = _expert_rows(expert_ids, cfg.num_experts) if fused else ()
    plan.update(mlp.expert_format.weight_plan(mlp, m, fused, expert_ids, rows, spec.expert_names))
    return plan


def _gpt_oss_plan(mlp: MoELayer, m: str, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int]) -> WeightPlan:
    """gpt-oss's MoE block: `router.weight` / `router.bias`, and the experts fused, with their biases:
    `experts.gate_up_proj` [E, D, 2I] (x @ W, not a linear's [out, in]) whose columns interleave gate and
    up (gate = [..., ::2], up = [..., 1::2]), `gate_up_proj_bias` [E, 2I] interleaved the same way,
    `down_proj` [E, I, D] and `down_proj_bias` [E, D].

    Read as moelink's layout by one advanced index each (the loader's checkpoint-index element): with
    e [E', 1, 1] this rank's experts, f [1, 2I, 1] the de-interleaving column order [0, 2, ..., 1, 3, ...]
    and d [1, 1, D], gate_up_proj[e, d, f] is w13 [E', 2I, D] = [gate; up] rows, transposed; down_proj[e,
    i, d] with i [1, 1, I], d [1, D, 1] is w2 [E', D, I].

    Quantized experts (MXFP4, as OpenAI publishes gpt-oss: `experts.*_blocks` / `*_scales`, already output-
    channel major) are their format's plan, the same de-interleaving included (moe/expert_weights.py)."""
    plan: WeightPlan = {m + f"{spec.router}.weight": PlanEntry(mlp.gate_GD, ()),
                        m + f"{spec.router}.bias": PlanEntry(mlp.gate_bias_G, ())}
    if mlp.expert_format.name != "float":
        rows = _expert_rows(expert_ids, cfg.num_experts)
        plan.update(mlp.expert_format.weight_plan(mlp, m, True, expert_ids, rows, spec.expert_names))
        return plan
    D, inter = cfg.hidden_size, cfg.moe_intermediate_size
    e = torch.tensor(expert_ids, dtype=torch.long)
    f = gate_up_order(inter)
    plan[m + "experts.gate_up_proj"] = PlanEntry(mlp.w13_EFD, (), (e[:, None, None], torch.arange(D)[None, None, :],
                                                                   f[None, :, None]))
    plan[m + "experts.gate_up_proj_bias"] = PlanEntry(mlp.b13_EF, (), (e[:, None], f[None, :]))
    plan[m + "experts.down_proj"] = PlanEntry(mlp.w2_EDI, (), (e[:, None, None], torch.arange(inter)[None, None, :],
                                                               torch.arange(D)[None, :, None]))
    plan[m + "experts.down_proj_bias"] = PlanEntry(mlp.b2_ED, (), (e,))
    return plan


def fused_experts_name(layer_idx: int) -> str:
    """The checkpoint tensor whose presence says layer `layer_idx` holds its experts fused."""
    return f"model.layers.{layer_idx}.mlp.experts.gate_up_proj"


def _expert_rows(expert_ids: list[int], num_experts: int) -> tuple:
    """Index into a fused [E, ...] checkpoint tensor that yields this rank's experts in local slot order:
    () for all of them, a slice for a contiguous run (read without the other rows), else the id list."""
    if expert_ids == list(range(num_experts)):
        return ()
    lo = expert_ids[0] if expert_ids else 0
    if expert_ids == list(range(lo, lo + len(expert_ids))):
        return (slice(lo, lo + len(expert_ids)),)
    return (torch.tensor(expert_ids, dtype=torch.long),)


__all__ = ["FFN", "FFNBlock", "SharedExpertsMoE", "TokenSlice", "ffn_kind", "ffn_stages", "fused_experts_name",
           "moe_activation", "overlapped"]
