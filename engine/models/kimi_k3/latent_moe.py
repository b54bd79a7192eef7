"""Kimi K3's latent MoE: its FFN kind "latent_shared".

The router reads the hidden states [T, D] (block_sparse_moe.gate, its correction bias); the routed experts run in a
latent space of routed_expert_hidden_size L: the token's projection routed_expert_down_proj(x) [T, L] is what is
dispatched (an all-to-all row is L wide, not D), the experts' weighted sum [T, L] comes back, is RMS-normed
(routed_expert_norm, when latent_moe_use_norm) and projected up (routed_expert_up_proj) to [T, D]; the shared
experts (num_shared_experts x moe_intermediate_size, SiTU-gated) run on x beside them. As vLLM, SGLang and mlx-lm
compute Kimi K3's.

Under expert parallelism the latent rows cross; the projections and the norm run on the sending rank (with TP as
well, on its token slice: engine/tp/experts.token_sliced_stages). Under tensor parallelism without EP every rank
holds every expert's slice of the intermediate channels (engine/tp/experts.ExpertShard) and the shared experts'
(split, not reduced): the experts' partial latents are all-reduced before the norm (it is not linear), the norm and
the up projection run whole on every rank and only the group's first rank adds them, so the block's one all-reduce
(blocks/ffn.ffn_stages) sums them once beside the shared experts' partial outputs.

Legend: T tokens, D hidden, L latent, G experts.
"""
from __future__ import annotations

import torch
from torch import nn

from moelink.kernels.moe import reference_fused_moe
from moelink.kernels.mxfp4 import reference_fused_moe_mxfp4
from moelink.kernels.situ import SiTU
from moelink.moe.layer import MoELayer, Stages
from moelink.moe.router import make_router
from moelink.moe.expert_weights import make_expert_format
from moelink.moe.weight_plan import WeightPlan

from ..blocks.context import BuildContext
from ..blocks.ffn import FFN, RoutedSharedFFN, SharedExpertsMoE, fused_experts_name, moe_activation
from ..layers import DenseMLP, RMSNorm
from ..linear import FloatLinear, Linear
from ...tp.experts import ExpertShard
from ...tp.group import TensorParallel
from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from .reader import KimiK3Fields


class _ReferenceExperts:
    """The device's kernels, the experts' fused MoE excepted (float or MXFP4): the plain-torch references, which take
    any activation (the Triton fused MoE has no SiTU epilogue yet: kernels/situ.py). Correct on a GPU, not fast."""

    fused_moe = staticmethod(reference_fused_moe)
    fused_moe_mxfp4 = staticmethod(reference_fused_moe_mxfp4)

    def __init__(self, kernels):
        self._kernels = kernels

    def __getattr__(self, name: str):
        return getattr(self._kernels, name)


class LatentMoELayer(MoELayer):
    """MoELayer whose experts are L wide (module docstring): `down_proj`, `norm` (or None), `up_proj` around it, the
    router's weight gate_GD [G, D]."""

    def __init__(self, hidden_size: int, latent: int, intermediate_size: int, num_experts: int, router, kernels,
                 dtype, device, *, latent_norm: bool, eps: float, split: TensorParallel | None = None, **kw):
        """split: the TP group whose ranks hold a slice of every expert's channels (None: the experts whole)."""
        if isinstance(kw.get("activation"), SiTU):
            kernels = _ReferenceExperts(kernels)
        super().__init__(latent, intermediate_size, num_experts, router, kernels, dtype, device, **kw)
        gate_dtype = self.gate_GD.dtype
        self.gate_GD = nn.Parameter(torch.empty(self.gate_GD.shape[0], hidden_size, dtype=gate_dtype, device=device),
                                    requires_grad=False)
        f = dict(dtype=dtype, device=device)
        self.down_proj = Linear(hidden_size, latent, FloatLinear(), kernels, **f)
        self.norm = RMSNorm(latent, eps, kernels, **f) if latent_norm else None
        self.up_proj = Linear(latent, hidden_size, FloatLinear(), kernels, **f)
        self.split = split

    def stages(self, x_TD: torch.Tensor, route_TX: torch.Tensor | None = None) -> Stages:
        y_TL = yield from super().stages(self.down_proj(x_TD), route_TX=x_TD)
        if self.split is not None:  # the channels' partial latents summed before the norm (module docstring)
            y_TL = self.split.all_reduce(y_TL)
            if self.split.rank:
                return x_TD.new_zeros(x_TD.shape)
        return self.up_proj(self.norm(y_TL) if self.norm is not None else y_TL)

    def latent_plan(self, m: str) -> WeightPlan:
        """The latent projections and norm under `m` ("model.layers.{i}.block_sparse_moe.")."""
        plan = {**self.down_proj.weight_plan(m + "routed_expert_down_proj.weight"),
                **self.up_proj.weight_plan(m + "routed_expert_up_proj.weight")}
        if self.norm is not None:
            plan.update(self.norm.weight_plan(m + "routed_expert_norm.weight"))
        return plan


@FFN.register("latent_shared")
class LatentSharedFFN(RoutedSharedFFN):
    """The latent MoE beside the shared experts (`mlp`: SharedExpertsMoE around the LatentMoELayer)."""

    def __init__(self, ctx: BuildContext, i: int):
        cfg, m = ctx.cfg, ctx.cfg.moe
        k3 = KimiK3Fields.read(cfg.hf_config, cfg.hidden_size, cfg.num_layers)
        quant = cfg.quantization
        experts = f"model.layers.{i}.{ctx.spec.moe_prefix}.experts"
        fmt = make_expert_format(quant if quant is None or quant.is_quantized(experts) else None,
                                 fused_experts_name(i) in ctx.names)
        # Under TP without EP each rank holds every expert's 1/N of the channels (module docstring).
        self.expert_shard = ExpertShard(ctx.tp, cfg.moe_intermediate_size) if ctx.tp and ctx.ep is None else None
        inter = self.expert_shard.w if self.expert_shard else cfg.moe_intermediate_size
        self.moe = LatentMoELayer(
            cfg.hidden_size, k3.latent_size, inter, cfg.num_experts, make_router(m.router), ctx.kernels, cfg.dtype,
            ctx.device, latent_norm=k3.latent_norm, eps=cfg.rms_norm_eps,
            split=ctx.tp if self.expert_shard else None, ep=ctx.ep,
            moe_index=ctx.moe_row(i), stats=ctx.stats, expert_format=fmt, activation=moe_activation(m, m.activation))
        shared = DenseMLP(cfg.hidden_size, cfg.moe_intermediate_size * m.n_shared_experts, cfg.dtype, ctx.device,
                          kernels=ctx.kernels, quant=quant,
                          prefix=f"model.layers.{i}.{ctx.spec.moe_prefix}.{ctx.spec.shared_experts}.",
                          activation=moe_activation(m, m.dense_activation),
                          **(dict(tp=ctx.tp, reduce=False) if self.expert_shard else {}))
        self.mlp = self.shared_moe = SharedExpertsMoE(self.moe, shared)
        self.modules = {"moe": self.moe, "mlp": self.mlp}

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan = super().weight_plan(p, layer_idx, cfg, spec, expert_ids, names)
        plan.update(self.moe.latent_plan(f"{p}{spec.moe_prefix}."))
        return plan


__all__ = ["LatentMoELayer", "LatentSharedFFN"]
