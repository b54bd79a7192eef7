"""Kimi K3's block attention residuals: its residual kind "attn_res", with the embedding and head kinds of the same
name that start and end its stream.

Where a pre-norm layer adds each block's output to one running residual, K3 keeps the sums of finished blocks of
`attn_res_block_size` layers (the embedding the first of them) and the running sum of the current block (`partial`);
the input of each attention, each FFN and the final norm is a softmax mix of them, per token:
    logit_s = (w_norm * w_proj) . s / rms(s)   for each source s (the finished blocks, then partial)
    mix = sum_s softmax(logits)_s * s
with one [1, D] projection and one RMSNorm weight per mix (self_attention_res_*, mlp_res_*, and the model's
output_attn_res_*), the mix computed in float32 (or wider) as the peers do (vLLM, SGLang and mlx-lm's Kimi K3). A
layer i with i % block_size == 0 closes the block before its attention (partial joins the finished ones and starts
again from the attention's output). Everything is per token: chunked prefill, prefix hits and the layers' split over
ranks (TP, EP) see the stream as they see the pre-norm one.

The stream's state: (blocks_TkD, partial_TD), k finished blocks (k = 0 before layer 0's close).

Legend: T tokens, k finished blocks, S = k + 1 sources, D hidden.
"""
from __future__ import annotations

from typing import Callable, cast

import torch
from torch import nn

from moelink.moe.layer import Stages
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.attention import AttentionKind, LayerAttentionConfig
from ..blocks.context import BuildContext
from ..blocks.ffn import FFNBlock, ffn_stages
from ..blocks.stream import EMBEDDING, HEAD, RESIDUAL, Head, Layer, StreamState
from ..layers import AuxCapture, ForwardContext, RMSNorm, param
from .reader import KimiK3Fields

AttnResState = tuple[torch.Tensor, torch.Tensor]


class AttnResMix(nn.Module):
    """One mix of the stream's sources (module docstring): `norm` and `proj` as the checkpoint names them
    (`{name}_norm.weight` [D], `{name}_proj.weight` [1, D])."""

    def __init__(self, size: int, eps: float, dtype, device=None):
        super().__init__()
        self.norm = param(size, dtype=dtype, device=device)
        self.proj = param(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, blocks_TkD: torch.Tensor, partial_TD: torch.Tensor) -> torch.Tensor:
        if blocks_TkD.shape[1] == 0:  # one source: its weight is 1
            return partial_TD
        wide = torch.promote_types(partial_TD.dtype, torch.float32)
        src_TSD = torch.cat((blocks_TkD, partial_TD[:, None]), dim=1).to(wide)
        w_D = self.norm.to(wide) * self.proj.to(wide)
        logits_TS = (src_TSD @ w_D) * torch.rsqrt(src_TSD.pow(2).mean(-1) + self.eps)
        p_TS = torch.softmax(logits_TS, dim=-1)
        return (p_TS[..., None] * src_TSD).sum(1).to(partial_TD.dtype)

    def weight_plan(self, name: str) -> WeightPlan:
        return {f"{name}_norm.weight": PlanEntry(self.norm, ()),
                f"{name}_proj.weight": PlanEntry(self.proj, (), (0,))}  # [1, D] on disk


def _fields(cfg: ModelConfig) -> KimiK3Fields:
    return KimiK3Fields.read(cfg.hf_config, cfg.hidden_size, cfg.num_layers)


EMBEDDING.add("attn_res", lambda cfg, x_TD: (x_TD.new_empty((x_TD.shape[0], 0, x_TD.shape[1])), x_TD))


@RESIDUAL.register("attn_res")
class AttnResLayer(Layer):
    """h = mix(attention); partial += attn(norm1(h)); h = mix(ffn); partial += ffn(norm2(h)) (module docstring)."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: LayerAttentionConfig,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        super().__init__(ctx)
        cfg = ctx.cfg
        D, eps, f = cfg.hidden_size, cfg.rms_norm_eps, dict(dtype=cfg.dtype, device=ctx.device)
        self.closes_block = i % _fields(cfg).attn_res_block_size == 0
        self.input_layernorm = RMSNorm(D, eps, ctx.kernels, **f)
        self.post_attention_layernorm = RMSNorm(D, eps, ctx.kernels, **f)
        self.self_attention_res = AttnResMix(D, eps, **f)
        self.mlp_res = AttnResMix(D, eps, **f)
        self.install(ctx, i, attention, attn_cfg, ffn)

    def stages(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        blocks_TkD, partial_TD = cast(AttnResState, state)  # this kind's stream (its embedding kind made it)
        h_TD = self.self_attention_res(blocks_TkD, partial_TD)
        y_TD = self.mixer(positions_T, self.input_layernorm(h_TD), ctx)
        if self.closes_block:
            blocks_TkD, partial_TD = torch.cat((blocks_TkD, partial_TD[:, None]), dim=1), y_TD
        else:
            partial_TD = partial_TD + y_TD
        h_TD = self.mlp_res(blocks_TkD, partial_TD)
        y_TD = yield from ffn_stages(self.ffn, self.tp, self.post_attention_layernorm(h_TD), input_ids_T)
        return blocks_TkD, partial_TD + y_TD

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan: WeightPlan = {}
        plan.update(self.input_layernorm.weight_plan(p + "input_layernorm.weight"))
        plan.update(self.post_attention_layernorm.weight_plan(p + "post_attention_layernorm.weight"))
        plan.update(self.self_attention_res.weight_plan(p + "self_attention_res"))
        plan.update(self.mlp_res.weight_plan(p + "mlp_res"))
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: StreamState) -> None:
        """The current block's running sum (a drafter conditioning on K3's stream: none is published yet)."""
        aux.take(n, cast(AttnResState, state)[1], None)


@HEAD.register("attn_res")
class AttnResHead(Head):
    """The last mix (output_attn_res_*), then the final RMSNorm."""

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        f = dict(dtype=cfg.dtype, device=ctx.device)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, **f)
        self.output_attn_res = AttnResMix(cfg.hidden_size, cfg.rms_norm_eps, **f)
        self.modules = {"norm": self.norm, "output_attn_res": self.output_attn_res}

    def finish(self, state: StreamState) -> torch.Tensor:
        return self.norm(self.output_attn_res(*cast(AttnResState, state)))

    def weight_plan(self) -> WeightPlan:
        return {**self.norm.weight_plan("model.norm.weight"),
                **self.output_attn_res.weight_plan("model.output_attn_res")}


__all__ = ["AttnResHead", "AttnResLayer", "AttnResMix"]
