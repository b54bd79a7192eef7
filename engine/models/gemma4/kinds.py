"""Gemma 4's block kinds (engine/models/blocks/registry.py imports this module), as transformers 5.24's
Gemma4TextDecoderLayer runs them:

    h = x + post_attention_layernorm(attn(input_layernorm(x)))
    d = post_feedforward_layernorm_1(mlp(pre_feedforward_layernorm(h)))                 (the dense MLP)
    e = post_feedforward_layernorm_2(experts(pre_feedforward_layernorm_2(h), router(h)))  (the routed experts)
    out = (h + post_feedforward_layernorm(d + e)) * layer_scalar

- the residual kind "gemma4" (Gemma4Layer): the attention's sandwich norms, the FFN block's output norm and the
  layer's scalar; the stream is (x, None), the whole residual (no deferred add: every add sits behind a norm).
- the FFN kind "gemma4_moe" (Gemma4FFN): the dense MLP and the routed experts side by side on the same h, each with
  its norms, their outputs added. The router reads h RMS-normed without a weight, times router.scale and
  hidden_size^-0.5 (router.proj's input); softmax in float32 over the experts, the top-k renormalised, each weight
  times router.per_expert_scale of its expert (Gemma4MoELayer). The experts are transformers' fused gate_up_proj
  [E, 2F, D] and down_proj [E, D, F] (moelink's w13 / w2 as stored). Both MLPs are gelu_pytorch_tanh-gated
  (GeluTanh); the experts run the plain-torch reference on every device (the Triton fused MoE has no GELU
  epilogue): correct on a GPU, not fast.
- the embedding kind "gemma4": the embedded tokens times sqrt(hidden_size) rounded to the model dtype (transformers'
  Gemma4TextScaledWordEmbedding); the head kind "gemma4": the final norm of the stream, and the final logits
  softcapped (cap * tanh(logits / cap)) by config.json's final_logit_softcapping (Head.logit_softcap).
Under tensor parallelism the family is refused (its norms run on whole rows; no TP plan here); expert parallelism
places the experts as every routed layer's.

Legend: T tokens, D hidden, E experts, K top-k, F expert width.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moelink.kernels.moe import MoEActivation, reference_fused_moe
from moelink.moe.expert_weights import make_expert_format
from moelink.moe.layer import MoELayer, Stages
from moelink.moe.router import make_router
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.context import BuildContext
from ..blocks.ffn import FFN, FFNBlock, fused_experts_name
from ..blocks.stream import EMBEDDING, HEAD, RESIDUAL, Layer, PlainHead, StreamState
from ..layers import AuxCapture, DenseMLP, ForwardContext, RMSNorm, param


@dataclass(frozen=True)
class GeluTanh(MoEActivation):
    """gelu_pytorch_tanh(gate) * up (transformers' ACT2FN["gelu_pytorch_tanh"]: torch's tanh-approximate GELU)."""

    kind: str = "gelu_tanh"

    def __post_init__(self) -> None:
        pass

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh") * up


GELU_TANH = GeluTanh()


def weightless_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma4RMSNorm(with_scale=False): x * (mean(x^2) + eps)^-0.5 in float32 (or wider), cast back."""
    x32 = x.float() if x.dtype.itemsize < 4 else x
    return (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5)).to(x.dtype)


class _ReferenceExperts:
    """The device's kernels with the experts' fused MoE replaced by the plain-torch reference, which takes any
    activation (the Triton fused MoE has no GELU epilogue)."""

    fused_moe = staticmethod(reference_fused_moe)

    def __init__(self, kernels):
        self._kernels = kernels

    def __getattr__(self, name: str):
        return getattr(self._kernels, name)


class Gemma4MoELayer(MoELayer):
    """MoELayer whose router reads the weightless-normed h times `scale_D` and D^-0.5 (the caller passes it as
    route_TX) and whose routing weights are multiplied by `per_expert_scale_G` of each pick."""

    def __init__(self, hidden_size: int, *args, **kw):
        super().__init__(hidden_size, *args, **kw)
        dtype, device = self.gate_GD.dtype, self.gate_GD.device
        self.scale_D = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.per_expert_scale_G = nn.Parameter(torch.ones(self.gate_GD.shape[0], dtype=dtype, device=device),
                                               requires_grad=False)

    def _replayed(self, logits_TG: torch.Tensor, weights_TK: torch.Tensor, ids_TK: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        weights_TK, ids_TK = super()._replayed(logits_TG, weights_TK, ids_TK)
        # transformers: top_k_weights * per_expert_scale[top_k_index] after the renormalisation (padding rows: -1)
        return weights_TK * self.per_expert_scale_G[ids_TK.clamp(min=0)].to(weights_TK.dtype), ids_TK


@FFN.register("gemma4_moe")
class Gemma4FFN(FFNBlock):
    """The dense MLP beside the routed experts (module docstring); `stages` takes the residual h (not normed)."""

    def __init__(self, ctx: BuildContext, i: int):
        cfg = ctx.cfg
        if ctx.tp is not None:
            raise ValueError(f"{cfg.architecture} under tensor parallelism is not supported yet: run it on one rank, "
                             f"or with expert parallelism.")
        D, eps, f = cfg.hidden_size, cfg.rms_norm_eps, dict(dtype=cfg.dtype, device=ctx.device)
        self.eps, self.root = eps, D ** -0.5
        self.mlp = DenseMLP(D, cfg.intermediate_size, cfg.dtype, ctx.device, kernels=ctx.kernels,
                            prefix=f"model.layers.{i}.mlp.", activation=GELU_TANH)
        fmt = make_expert_format(None, fused_experts_name(i) in ctx.names)
        self.moe = Gemma4MoELayer(D, cfg.moe_intermediate_size, cfg.num_experts, make_router(cfg.moe.router),
                                  _ReferenceExperts(ctx.kernels), cfg.dtype, ctx.device, ep=ctx.ep,
                                  moe_index=ctx.moe_row(i), stats=ctx.stats, expert_format=fmt, activation=GELU_TANH)
        self.pre_feedforward_layernorm = RMSNorm(D, eps, ctx.kernels, **f)
        self.post_feedforward_layernorm_1 = RMSNorm(D, eps, ctx.kernels, **f)
        self.pre_feedforward_layernorm_2 = RMSNorm(D, eps, ctx.kernels, **f)
        self.post_feedforward_layernorm_2 = RMSNorm(D, eps, ctx.kernels, **f)
        self.modules = {"mlp": self.mlp, "moe": self.moe,
                        "pre_feedforward_layernorm": self.pre_feedforward_layernorm,
                        "post_feedforward_layernorm_1": self.post_feedforward_layernorm_1,
                        "pre_feedforward_layernorm_2": self.pre_feedforward_layernorm_2,
                        "post_feedforward_layernorm_2": self.post_feedforward_layernorm_2}

    def stages(self, h_TD: torch.Tensor, input_ids_T: torch.Tensor | None) -> Stages:
        d_TD = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h_TD)))
        route_TD = weightless_rms_norm(h_TD, self.eps) * self.moe.scale_D * self.root
        e_TD = yield from self.moe.stages(self.pre_feedforward_layernorm_2(h_TD), route_TX=route_TD)
        return d_TD + self.post_feedforward_layernorm_2(e_TD)

    def moe_only_stages(self, x_0D: torch.Tensor) -> Stages:
        return (yield from self.moe.stages(x_0D))

    @property
    def refuses_padding_rows(self) -> bool:
        return self.moe.ep is not None and not self.moe.ep.all_to_all.accepts_padding_rows

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        moe = self.moe
        rows: tuple = ()
        if expert_ids != list(range(cfg.num_experts)):  # this rank's experts (expert parallelism)
            rows = (torch.tensor(expert_ids, dtype=torch.long),)
        plan: WeightPlan = {
            p + "router.proj.weight": PlanEntry(moe.gate_GD, ()),
            p + "router.scale": PlanEntry(moe.scale_D, ()),
            p + "router.per_expert_scale": PlanEntry(moe.per_expert_scale_G, ()),
            p + "experts.gate_up_proj": PlanEntry(moe.w13_EFD, (), rows),
            p + "experts.down_proj": PlanEntry(moe.w2_EDI, (), rows),
        }
        plan.update(self.mlp.weight_plan(p + "mlp."))
        for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm_1", "pre_feedforward_layernorm_2",
                     "post_feedforward_layernorm_2"):
            plan.update(getattr(self, name).weight_plan(f"{p}{name}.weight"))
        return plan


@RESIDUAL.register("gemma4")
class Gemma4Layer(Layer):
    """The module docstring's layer; the stream is (x, None)."""

    def __init__(self, ctx: BuildContext, i: int, attention, attn_cfg, ffn):
        super().__init__(ctx)
        cfg = ctx.cfg
        D, eps, f = cfg.hidden_size, cfg.rms_norm_eps, dict(dtype=cfg.dtype, device=ctx.device)
        self.input_layernorm = RMSNorm(D, eps, ctx.kernels, **f)
        self.post_attention_layernorm = RMSNorm(D, eps, ctx.kernels, **f)
        self.post_feedforward_layernorm = RMSNorm(D, eps, ctx.kernels, **f)
        self.layer_scalar = param(1, **f)
        self.is_sparse = i in cfg.sparse_layers
        self.install(ctx, i, attention, attn_cfg, ffn)

    def stages(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        x_TD, _ = state  # the gemma4 stream: (x, None)
        h_TD = x_TD + self.post_attention_layernorm(self.mixer(positions_T, self.input_layernorm(x_TD), ctx))
        y_TD = yield from self.ffn.stages(h_TD, input_ids_T)
        return (h_TD + self.post_feedforward_layernorm(y_TD)) * self.layer_scalar, None

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan: WeightPlan = {}
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        for name in ("input_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"):
            plan.update(getattr(self, name).weight_plan(f"{p}{name}.weight"))
        plan[p + "layer_scalar"] = PlanEntry(self.layer_scalar, ())
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: StreamState) -> None:
        aux.take(n, *state)


def _embed(cfg: ModelConfig, x_TD: torch.Tensor) -> StreamState:
    """x * sqrt(hidden_size), the scale rounded to the model dtype first (transformers' embed_scale buffer)."""
    return x_TD * torch.tensor(cfg.hidden_size ** 0.5, dtype=x_TD.dtype, device=x_TD.device), None


EMBEDDING.add("gemma4", _embed)


@HEAD.register("gemma4")
class Gemma4Head(PlainHead):
    """The final RMSNorm of the stream (no deferred add), and final_logit_softcapping on the logits."""

    def __init__(self, ctx: BuildContext):
        super().__init__(ctx)
        cap = (ctx.cfg.hf_config or {}).get("final_logit_softcapping")
        self.logit_softcap = float(cap) if cap else None

    def finish(self, state: StreamState) -> torch.Tensor:
        x_TD, _ = state
        return self.norm(x_TD)


__all__ = ["GELU_TANH", "Gemma4FFN", "Gemma4Head", "Gemma4Layer", "Gemma4MoELayer", "GeluTanh",
           "weightless_rms_norm"]
