"""Qwen3.8-Flash-Next's block kinds, registered for the one decoder (engine/models/moe_decoder.py):
embedding → hc_count streams ("hc_streams", DeepSeek-V4's) → layers ("gated_hyper") → "hc_mixer" → LM head.

"gated_hyper" (GatedHyperLayer): [PLE on the ple_layer_ids layers (ple.py)], then the gated hyper-connection
(hyper.py) collapses the streams into the token mixer's input and spreads its output back; the same around the MoE
block. No pre-norms: the hyper-connections norm the streams. "hc_mixer": the last collapse, no final norm (the
LM head reads it). "qsa": QSA attention (qsa.py).

Under tensor parallelism the hyper-connections and the PLE (per token, on the full streams) are whole on every rank,
but for the PLE's n-gram tables: a rank holds its columns of every row, the looked-up rows all-gathered.

Legend: T tokens, n streams, D hidden.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from moelink.moe.layer import Stages
from moelink.moe.weight_plan import WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..blocks.attention import ATTENTION, AttentionKind
from ..blocks.context import BuildContext
from ..blocks.ffn import FFNBlock, ffn_stages
from ..blocks.stream import HEAD, RESIDUAL, Head, Layer
from ..layers import AuxCapture, ForwardContext
from .hyper import GatedHyperConnection
from .ple import PLE
from .qsa import QSAAttention
from .reader import PLELinearConfig


def _qsa(ctx: BuildContext, i: int, attn) -> QSAAttention:
    cfg = ctx.cfg
    if cfg.kv_cache_dtype not in (None, cfg.dtype):
        raise ValueError(f"kv_cache_dtype={cfg.kv_cache_dtype} is not supported for {cfg.architecture}: its QSA "
                         "layers read their cache in the model dtype ('auto') in this build.")
    return QSAAttention(i, cfg.hidden_size, attn, cfg.rms_norm_eps, ctx.rope(i), ctx.kernels, cfg.dtype, ctx.device,
                        cfg.quantization, tp=ctx.tp, max_model_len=cfg.max_model_len)


ATTENTION.add("qsa", AttentionKind("self_attn", _qsa))


def _hc(cfg: ModelConfig):
    hc = cfg.hyper_connections
    if hc is None or hc.mixing != "gated":
        raise ValueError(f"architecture {cfg.architecture}: its ModelConfig has no gated hyper_connections.")
    return hc


class _PLEReplay:
    """A verify step's StateHook for one PLE (blocks/attention.StateHook)."""

    def __init__(self, ple: PLE):
        self.ple = ple

    def before(self, ctx: ForwardContext, positions_T: torch.Tensor) -> None:
        return None

    def replay(self, num_accepted_S: torch.Tensor) -> None:
        self.ple.replay_states(num_accepted_S)


@RESIDUAL.register("gated_hyper")
class GatedHyperLayer(Layer):
    """[PLE,] gated hyper-connections around the token mixer and the FFN block: the stream is x_TnD."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: Any,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        super().__init__(ctx)
        cfg = ctx.cfg
        hc, D, eps = _hc(cfg), cfg.hidden_size, cfg.rms_norm_eps
        self.layer_idx = i
        ple = attn_cfg.ple if isinstance(attn_cfg, PLELinearConfig) else None
        self.ple = PLE(ple, D, eps, ctx.kernels, cfg.dtype, ctx.device, ctx.tp) if ple is not None else None
        self.attn_hc = GatedHyperConnection(hc, D, eps, ctx.kernels, cfg.dtype, ctx.device)
        self.mlp_hc = GatedHyperConnection(hc, D, eps, ctx.kernels, cfg.dtype, ctx.device)
        self.install(ctx, i, attention, attn_cfg, ffn)

    def stages(self, positions_T: torch.Tensor, state: Any, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        x_TnD = state
        if self.ple is not None:
            assert input_ids_T is not None  # the n-gram tables hash the token ids
            x_TnD = self.ple(x_TnD, input_ids_T, ctx.kv_caches[self.layer_idx][2:4], ctx)
        h_TD, gates = self.attn_hc.collapse(x_TnD)
        assert gates is not None
        x_TnD = self.attn_hc.residual(x_TnD, self.mixer(positions_T, h_TD, ctx), gates)
        h_TD, gates = self.mlp_hc.collapse(x_TnD)
        assert gates is not None
        y_TD = yield from ffn_stages(self.ffn, self.tp, h_TD, input_ids_T)
        return self.mlp_hc.residual(x_TnD, y_TD, gates)

    def state_hook(self) -> Any:
        """The PLE's states around a verify step (nothing before; its replay after sampling)."""
        return _PLEReplay(self.ple) if self.ple is not None else None

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan: WeightPlan = {**self.attn_hc.weight_plan(p + "attn_hyper_connection."),
                            **self.mlp_hc.weight_plan(p + "mlp_hyper_connection.")}
        if self.ple is not None:
            plan.update(self.ple.weight_plan(p + "ple.", names))
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: Any) -> None:
        """The streams flat, [T, n D]."""
        aux.take(n, state.flatten(1), None)


@HEAD.register("hc_mixer")
class HyperMixerHead(Head):
    """The streams' last gated collapse (no inject gates), read by the LM head as it is: the model has no final
    norm (model.hyper_connection_mixer.*)."""

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        self.mixer = GatedHyperConnection(_hc(cfg), cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype,
                                          ctx.device, inject=False)
        self.modules = {"hyper_connection_mixer": self.mixer}

    def finish(self, state: Any) -> torch.Tensor:
        return self.mixer.collapse(state)[0]

    def weight_plan(self) -> WeightPlan:
        return self.mixer.weight_plan("model.hyper_connection_mixer.")


__all__ = ["GatedHyperLayer", "HyperMixerHead"]
