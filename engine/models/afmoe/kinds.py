"""AFMoE's block kinds (engine/models/blocks/registry.py imports this module):

- residual "afmoe": h = x + post_attention_layernorm(attn(input_layernorm(x))); out = h +
  post_mlp_layernorm(ffn(pre_mlp_layernorm(h))), four RMSNorms a layer (transformers' AfmoeDecoderLayer); the stream
  is (x, None), no deferred add; the attention never takes the fused decode input (its output gate keeps it out).
- embedding "afmoe": the embeddings times sqrt(hidden_size) where config.json's mup_enabled is true.
- head "afmoe": the final RMSNorm of the stream.
- checkpoint "afmoe": the "hf" names, with self_attn.gate_proj (the output gate, [N * H, D]) read into the gate rows
  of the q stack (GQAConfig.output_gate holds each layer's q rows then its gate rows) and q_proj into the q rows
  as stored; float weights on one rank: a plan that splits the stack (tensor parallelism) or quantizes it is refused
  naming gate_proj."""
from __future__ import annotations

import re

import torch
from torch import nn

from moelink.moe.layer import Stages
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.checkpoint import CHECKPOINT, CheckpointKind, aliased, converted
from ..blocks.context import BuildContext
from ..blocks.ffn import ffn_stages
from ..blocks.stream import EMBEDDING, HEAD, RESIDUAL, Layer, PlainHead, StreamState
from ..layers import AuxCapture, ForwardContext, RMSNorm

_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm")


@RESIDUAL.register("afmoe")
class AfmoeLayer(Layer):
    """The module docstring's layer."""

    def __init__(self, ctx: BuildContext, i: int, attention, attn_cfg, ffn):
        super().__init__(ctx)
        cfg = ctx.cfg
        for name in _NORMS:
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device))
        self.is_sparse = i in cfg.sparse_layers
        self.install(ctx, i, attention, attn_cfg, ffn)
        self.mixer.fusion = None

    def stages(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        x_TD, _ = state  # the afmoe stream: (x, None)
        h_TD = x_TD + self.post_attention_layernorm(self.mixer(positions_T, self.input_layernorm(x_TD), ctx))
        y_TD = yield from ffn_stages(self.ffn, self.tp, self.pre_mlp_layernorm(h_TD), input_ids_T)
        return h_TD + self.post_mlp_layernorm(y_TD), None

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan: WeightPlan = {}
        for name in _NORMS:
            plan.update(getattr(self, name).weight_plan(f"{p}{name}.weight"))
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: StreamState) -> None:
        aux.take(n, *state)


def _embed(cfg: ModelConfig, x_TD: torch.Tensor) -> StreamState:
    """x * sqrt(hidden_size) under muP (a Python float, as transformers multiplies), else x."""
    if (cfg.hf_config or {}).get("mup_enabled"):
        x_TD = x_TD * (cfg.hidden_size ** 0.5)
    return x_TD, None


EMBEDDING.add("afmoe", _embed)


@HEAD.register("afmoe")
class AfmoeHead(PlainHead):
    """The final RMSNorm of the stream (no deferred add)."""

    def finish(self, state: StreamState) -> torch.Tensor:
        x_TD, _ = state
        return self.norm(x_TD)


_Q = re.compile(r"^(.*\.layers\.\d+\.self_attn\.)q_proj\.weight$")


def _plan(cfg: ModelConfig, spec: ArchSpec, plan: WeightPlan, names: frozenset[str]) -> WeightPlan:
    """q_proj into the q rows of each layer's gated q piece as stored, gate_proj into its gate rows."""
    out: WeightPlan = {}
    for name, entry in aliased(cfg, spec, plan, names).items():
        m = _Q.match(name)
        if m is None:
            out[name] = entry
            continue
        dest, index, _ = entry
        rows = index[0] if len(index) == 1 else None
        if not isinstance(dest, nn.Parameter) or not isinstance(rows, slice) or (rows.stop - rows.start) % 2:
            raise ValueError(f"{cfg.architecture}: {m.group(1)}gate_proj is read into the float q stack of one rank "
                             f"only: quantized attention weights and tensor parallelism are not supported for it.")
        half = (rows.stop - rows.start) // 2
        out[name] = PlanEntry(dest, (slice(rows.start, rows.start + half),), ())
        out[f"{m.group(1)}gate_proj.weight"] = PlanEntry(dest, (slice(rows.start + half, rows.stop),), ())
    return out


CHECKPOINT.add("afmoe", CheckpointKind(_plan, converted))

__all__ = ["AfmoeHead", "AfmoeLayer"]
