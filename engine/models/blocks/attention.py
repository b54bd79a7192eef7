"""Attention kinds (token mixers), registered by the `kind` of a layer's attention config
(ModelConfig.attention_for): "gqa" (gqa.py; sliding windows and sinks are its config), "mla" (mla.py; with an
indexer in its config, DeepSeek Sparse Attention: dsa.py), "block_sparse" (GQA over the key blocks an indexer keeps,
MiniMax-M3: block_sparse.py), "linear" (gated DeltaNet, gated_deltanet.py), "kda" (Kimi Delta
Attention, kimi_delta.py: gated DeltaNet with a decay per key channel), "mamba2" (Mamba2's selective state-space
mixer, mamba2.py: Granite 4.0-H's `mamba` layers), "short_conv" (LFM2's gated short convolution, short_conv.py:
its `conv` layers). A family adds its own from its package
(DeepSeek-V4's: engine/models/deepseek_v4/)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from ..block_sparse import BlockSparseAttention
from ..gated_deltanet import GatedDeltaNet
from ..gqa import GQAAttention
from ..kimi_delta import KimiDeltaAttention
from ..layers import ForwardContext
from ..mamba1 import Mamba1Mixer
from ..mamba2 import Mamba2Mixer
from ..mla import MLAAttention
from ..short_conv import ShortConvMixer
from .context import BuildContext
from .registry import Registry


class LayerAttentionConfig(Protocol):
    """What every layer's attention config has (GQAConfig, MLAConfig, LinearAttentionConfig, a family's own): its
    `kind`, the key of ATTENTION; the rest is its kind's (each builder reads its own config class)."""

    @property
    def kind(self) -> str: ...


class StateHook(Protocol):
    """What a kind with per-sequence state does around a verify step (speculative decoding): `before` the
    forward (copy what a rejected draft would overwrite), `replay` after sampling (back to the accepted tokens)."""

    def before(self, ctx: ForwardContext, positions_T: torch.Tensor) -> None: ...

    def replay(self, num_accepted_S: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class AttentionKind:
    """module_name: the layer attribute, which is also the checkpoint's name (self_attn, linear_attn, attn).
    build(ctx, layer index, that layer's attention config) -> the module: `module(positions_T, h_TD, ctx)`,
    `module.weight_plan(prefix)`. state_hook(the model's modules of this kind) -> its StateHook, or None."""

    module_name: str
    build: Callable[[BuildContext, int, LayerAttentionConfig], nn.Module]
    state_hook: Callable[[Sequence[nn.Module]], StateHook | None] = lambda mixers: None


ATTENTION: Registry[AttentionKind] = Registry("attention")


def _gqa(ctx: BuildContext, i: int, attn) -> nn.Module:
    cfg = ctx.cfg
    return GQAAttention(i, cfg.hidden_size, attn, cfg.rms_norm_eps, ctx.rope(i), ctx.kernels, cfg.dtype, ctx.device,
                        cfg.quantization, sinks_name=ctx.spec.sinks, tp=ctx.tp)


def _block_sparse(ctx: BuildContext, i: int, attn) -> nn.Module:
    cfg = ctx.cfg
    return BlockSparseAttention(i, cfg.hidden_size, attn, cfg.rms_norm_eps, ctx.rope(i), ctx.kernels, cfg.dtype,
                                ctx.device, cfg.quantization, cfg.max_model_len, tp=ctx.tp)


def _mla(ctx: BuildContext, i: int, attn) -> nn.Module:
    cfg = ctx.cfg
    return MLAAttention(i, cfg.hidden_size, attn, ctx.rope(i), ctx.kernels, cfg.dtype, ctx.device, cfg.quantization,
                        cfg.max_model_len, tp=ctx.tp)


def _linear(ctx: BuildContext, i: int, attn) -> nn.Module:
    cfg = ctx.cfg
    return GatedDeltaNet(i, cfg.hidden_size, attn, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device, tp=ctx.tp,
                         quant=cfg.quantization)


def _kda(ctx: BuildContext, i: int, attn) -> nn.Module:
    cfg = ctx.cfg
    return KimiDeltaAttention(i, cfg.hidden_size, attn, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device,
                              tp=ctx.tp, quant=cfg.quantization)


def _mamba1(ctx: BuildContext, i: int, attn) -> nn.Module:
    cfg = ctx.cfg
    if ctx.tp is not None:  # engine/config/tensor_parallel.py refuses it first; a direct build says so too
        raise ValueError(f"tensor parallelism is not supported for {cfg.architecture}'s Mamba1 layers yet.")
    return Mamba1Mixer(i, cfg.hidden_size, attn, ctx.kernels, cfg.dtype, ctx.device, quant=cfg.quantization)


def _mamba2(ctx: BuildContext, i: int, attn) -> nn.Module:
    cfg = ctx.cfg
    if ctx.tp is not None:  # engine/config/tensor_parallel.py refuses it first; a direct build says so too
        raise ValueError(f"tensor parallelism is not supported for {cfg.architecture}'s Mamba2 layers yet.")
    return Mamba2Mixer(i, cfg.hidden_size, attn, ctx.kernels, cfg.dtype, ctx.device, quant=cfg.quantization)


def _short_conv(ctx: BuildContext, i: int, attn) -> nn.Module:
    cfg = ctx.cfg
    if ctx.tp is not None:  # engine/config/tensor_parallel.py refuses it first; a direct build says so too
        raise ValueError(f"tensor parallelism is not supported for {cfg.architecture}'s short-conv layers yet.")
    return ShortConvMixer(i, cfg.hidden_size, attn, ctx.kernels, cfg.dtype, ctx.device, quant=cfg.quantization)


class _ReplayLinear:
    """Gated DeltaNet's (and KDA's, Mamba2's, the short conv's) verify step: each layer's verifying sequences take their accepted tokens into their states
    after sampling (engine/state/step.VerifySplit); nothing to do before."""

    def __init__(self, mixers: Sequence[nn.Module]):
        self.mixers = list(mixers)

    def before(self, ctx: ForwardContext, positions_T: torch.Tensor) -> None:
        return None

    def replay(self, num_accepted_S: torch.Tensor) -> None:
        for mixer in self.mixers:
            mixer.replay_states(num_accepted_S)  # GatedDeltaNet's, Mamba2Mixer's, ShortConvMixer's


ATTENTION.add("gqa", AttentionKind("self_attn", _gqa))
ATTENTION.add("mla", AttentionKind("self_attn", _mla))
ATTENTION.add("block_sparse", AttentionKind("self_attn", _block_sparse))
ATTENTION.add("linear", AttentionKind("linear_attn", _linear, _ReplayLinear))
ATTENTION.add("kda", AttentionKind("self_attn", _kda, _ReplayLinear))
# Mamba1 (Jamba's mamba layers, mamba1.py: a decay per channel and state entry, no heads); its states as Mamba2's.
ATTENTION.add("mamba1", AttentionKind("mamba", _mamba1, _ReplayLinear))
ATTENTION.add("mamba2", AttentionKind("mamba", _mamba2, _ReplayLinear))
ATTENTION.add("short_conv", AttentionKind("conv", _short_conv, _ReplayLinear))

__all__ = ["ATTENTION", "AttentionKind", "LayerAttentionConfig", "StateHook"]
