"""The residual stream's kinds: how it starts (embedding kinds), how each layer wires its attention and FFN blocks
into it (residual kinds), and how it ends (head kinds). The three go together: each residual kind keeps the stream
in a form of its own (`state`), which its embedding kind makes and its head kind ends.

- Residual kinds: the kind is the layer's class, "prenorm" (PreNormLayer, most families), "parallel"
  (ParallelLayer: attention and FFN side by side behind one norm, Cohere's) or a family's own (V4's
  hyper-connections, "hyper": engine/models/deepseek_v4/blocks.py).
- Embedding kinds turn the embedded tokens [T, D] into the stream's first state; head kinds end the last state in
  the final-normed hidden states [T, D] and name their checkpoint tensors. "plain" for both is every family's but
  DeepSeek-V4's (its hyper-connection streams: "hc_streams" / "hc_head"). The embedding and LM head tables are the
  decoder's (vocab-parallel under TP, engine/tp/vocab.py); the kinds say only what happens between them and the
  layers.

Legend: T tokens, D hidden.
"""
from __future__ import annotations

from abc import ABC, ABCMeta, abstractmethod
from typing import Callable, Protocol, Union

import torch
from torch import nn

from moelink.moe.layer import Stages, run_stages
from moelink.moe.weight_plan import WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ..layers import AuxCapture, ForwardContext, RMSNorm
from .attention import AttentionKind, LayerAttentionConfig, StateHook
from .context import BuildContext
from .ffn import FFNBlock, ffn_stages
from .registry import Registry

# The residual stream between layers, in its residual kind's form: the prenorm kinds' (x_TD, residual_TD), residual
# None before the first layer (the deferred add), or the hyper-connection kinds' n streams x_TnD. An embedding kind
# makes it, each layer passes it on, a head kind ends it.
PreNormState = tuple[torch.Tensor, Union[torch.Tensor, None]]
StreamState = Union[PreNormState, torch.Tensor]

EMBEDDING: Registry[Callable[[ModelConfig, torch.Tensor], StreamState]] = Registry("embedding")
EMBEDDING.add("plain", lambda cfg, x_TD: (x_TD, None))  # PreNormLayer's (x, residual), no residual yet


class Head(ABC):
    """`modules`: what the decoder holds, by attribute name (model.norm, ...). `lm_head_name`: the LM head's
    checkpoint tensor (unless tied to the embedding)."""

    modules: dict[str, nn.Module]
    lm_head_name = "lm_head.weight"
    tieable = True  # config.json's tie_word_embeddings may share the embedding table
    # The LM head held and run in float32 under a half-precision model, as transformers keeps it for some families
    # (Hunyuan Hy4's _keep_in_fp32_modules_strict: logits from float32 weights and float32 hidden states).
    lm_head_float32 = False
    # The LM head's bias tensor in the checkpoint, where the family has one (PhiMoE's lm_head.bias, config.json's
    # lm_head_bias): the decoder holds it beside the head and adds it to the logits. "" (most): no bias.
    lm_head_bias_name = ""
    # The logits softcapped, cap * tanh(logits / cap) (Gemma 4's final_logit_softcapping): the cap, or None (most).
    logit_softcap: float | None = None

    @abstractmethod
    def finish(self, state: StreamState) -> torch.Tensor:
        """The last layer's stream -> the final-normed hidden states [T, D]."""

    @abstractmethod
    def weight_plan(self) -> WeightPlan:
        """The head's checkpoint names (the final norm, ...)."""


HEAD: Registry[Callable[[BuildContext], Head]] = Registry("head")


@HEAD.register("plain")
class PlainHead(Head):
    """The final RMSNorm, the last layer's residual add fused into it."""

    def __init__(self, ctx: BuildContext):
        cfg = ctx.cfg
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)
        self.modules = {"norm": self.norm}

    def finish(self, state: StreamState) -> torch.Tensor:
        h_TD, _ = self.norm.add_forward(*state)
        return h_TD

    def weight_plan(self) -> WeightPlan:
        return self.norm.weight_plan("model.norm.weight")


class Layer(nn.Module, metaclass=ABCMeta):
    """What every residual kind holds: the token mixer under its checkpoint name (`mixer_name`), the FFN block's
    modules under theirs (`ffn`: its FFNBlock; `moe`: its routed experts or None)."""

    mixer_name: str
    ffn: FFNBlock

    def __init__(self, ctx: BuildContext):
        super().__init__()
        self.tp = ctx.tp

    def install(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: LayerAttentionConfig,
                ffn: Callable[[BuildContext, int], FFNBlock]) -> None:
        """Build the mixer and the FFN block and hold their modules (attention first, as the checkpoint lists them)."""
        self.mixer_name = attention.module_name
        setattr(self, self.mixer_name, attention.build(ctx, i, attn_cfg))
        self.ffn = ffn(ctx, i)
        self.moe = self.ffn.moe
        self.expert_shard = self.ffn.expert_shard
        for name, module in self.ffn.modules.items():
            setattr(self, name, module)

    @property
    def mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    def state_hook(self) -> StateHook | None:
        """What the layer's own per-sequence state beside its mixer's does around a verify step (a StateHook:
        blocks/attention.py), or None: most layers keep none (Qwen3.8-Flash-Next's PLE does)."""
        return None

    def forward(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None, ctx: ForwardContext):
        return run_stages(self.stages(positions_T, state, input_ids_T, ctx))

    @abstractmethod
    def stages(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        """The layer as stages (moe.layer.MoELayer.stages): yields while its MoE all-to-all is in flight, returns
        the stream after it. A dense layer never yields."""

    @abstractmethod
    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        """The layer's checkpoint names under `p` ("model.layers.{i}.", or an MTP layer's own)."""

    @staticmethod
    @abstractmethod
    def capture(aux: AuxCapture, n: int, state: StreamState) -> None:
        """Keep the stream after `n` layers for a drafter (ForwardContext.aux)."""


class LayerClass(Protocol):
    def __call__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: LayerAttentionConfig,
                 ffn: Callable[[BuildContext, int], FFNBlock]) -> Layer: ...

    def capture(self, aux: AuxCapture, n: int, state: StreamState) -> None: ...


RESIDUAL: Registry[LayerClass] = Registry("residual")


def prenorm(norm: RMSNorm, x_TD: torch.Tensor, residual_TD: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual): the deferred residual add fused into the norm, or before the first layer
    (residual None) the norm of x alone, x the residual."""
    if residual_TD is None:
        return norm(x_TD), x_TD
    return norm.add_forward(x_TD, residual_TD)


def mixer_and_ffn_norm(norm: RMSNorm, post_norm: RMSNorm, mixer: nn.Module, ffn: FFNBlock,
                       positions_T: torch.Tensor, x_TD: torch.Tensor, residual_TD: torch.Tensor | None,
                       ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
    """The prenorm layer's first half: (post_norm(m + s), m + s) where s = x + residual and m = mixer(norm(s)),
    the FFN block's input and the residual stream. A mixer that takes the norms into its own launches where a
    step allows it (its `fusion` at decode batches: engine/models/fused_output.py, GQA's gqa_input.py) is handed
    the stream, and the FFN block's FP8 input handoff where there is one (the output launch then quantizes the
    experts' input as ffn_prenorm's norm would)."""
    fused = getattr(mixer, "fusion", None)
    if fused is not None and fused.takes(x_TD):
        post = post_norm if fused.takes_output(x_TD) else None
        out_TD, residual_TD = mixer.forward_fused(norm, post, positions_T, x_TD, residual_TD, ctx,
                                                  handoff=_fp8_handoff(ffn, x_TD.shape[0]))
        if post is not None:
            return out_TD, residual_TD
    else:
        h_TD, residual_TD = prenorm(norm, x_TD, residual_TD)
        out_TD = mixer(positions_T, h_TD, ctx)
    return ffn_prenorm(post_norm, ffn, out_TD, residual_TD)


def _fp8_handoff(ffn: FFNBlock, T: int):
    """The FFN block's FP8 experts' input handoff for a T-token step (moe/fp8_input.py), None without one."""
    return ffn.moe.fp8_input_for(T) if getattr(ffn.moe, "fp8_input", None) is not None else None


def ffn_prenorm(norm: RMSNorm, ffn: FFNBlock, x_TD: torch.Tensor, residual_TD: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN block's norm with the residual add; where the block's FP8 experts take their input quantized by it
    (moe/fp8_input.py: the Triton kernels on CUDA), the norm writes that copy in its own launch and hands it over,
    so the experts run no quantization launch."""
    handoff = _fp8_handoff(ffn, x_TD.shape[0])
    if handoff is None:
        return norm.add_forward(x_TD, residual_TD)
    h_TD, residual_TD, xq_TD, xs_TG = norm.add_forward_fp8(x_TD, residual_TD, handoff.group)
    handoff.hand(h_TD, xq_TD, xs_TG)
    return h_TD, residual_TD


@RESIDUAL.register("prenorm")
class PreNormLayer(Layer):
    """h = x + attn(norm1(x));  out = h + ffn(norm2(h)), the residual add fused into the next norm: the stream is
    (x_TD, residual_TD), residual None before the first layer."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: LayerAttentionConfig,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)
        self.is_sparse = i in cfg.sparse_layers
        self.install(ctx, i, attention, attn_cfg, ffn)

    def stages(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        x_TD, residual_TD = state
        h_TD, residual_TD = mixer_and_ffn_norm(self.input_layernorm, self.post_attention_layernorm, self.mixer,
                                               self.ffn, positions_T, x_TD, residual_TD, ctx)
        return (yield from ffn_stages(self.ffn, self.tp, h_TD, input_ids_T)), residual_TD

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan: WeightPlan = {}
        plan.update(self.input_layernorm.weight_plan(p + "input_layernorm.weight"))
        plan.update(self.post_attention_layernorm.weight_plan(p + "post_attention_layernorm.weight"))
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: StreamState) -> None:
        aux.take(n, *state)


@RESIDUAL.register("parallel")
class ParallelLayer(Layer):
    """The parallel block (Cohere's): h = norm(x); out = x + attn(h) + ffn(h), one norm shared by the attention and
    the FFN block. The stream is the prenorm kinds' (x_TD, residual_TD), the residual add deferred into the next
    norm: this layer returns (ffn(h), x + attn(h)), whose sum is transformers' (x + attn(h)) + ffn(h) to the bit.
    The attention never takes the fused decode input (its launch runs the prenorm layer's two norms)."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: LayerAttentionConfig,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        super().__init__(ctx)
        cfg = ctx.cfg
        self.input_layernorm = self.make_norm(ctx)
        self.is_sparse = i in cfg.sparse_layers
        self.install(ctx, i, attention, attn_cfg, ffn)

    def make_norm(self, ctx: BuildContext) -> nn.Module:
        """The layer's one norm (RMSNorm; a family's kind may hold another with the same interface: forward,
        add_forward, weight_plan)."""
        cfg = ctx.cfg
        return RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ctx.kernels, cfg.dtype, ctx.device)

    def stages(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        x_TD, residual_TD = state
        h_TD, residual_TD = prenorm(self.input_layernorm, x_TD, residual_TD)
        residual_TD = residual_TD + self.mixer(positions_T, h_TD, ctx)
        return (yield from ffn_stages(self.ffn, self.tp, h_TD, input_ids_T)), residual_TD

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan: WeightPlan = {}
        plan.update(self.input_layernorm.weight_plan(p + "input_layernorm.weight"))
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: StreamState) -> None:
        aux.take(n, *state)


class HyperConnectedLayer(Layer):
    """Hyper-connections (engine/models/hyper_connections.py) around the attention and the FFN block, each behind a
    norm: the stream is x_TnD, n streams. The flow is shared; each residual kind names its two norms (`norms`) and
    its weights. Under tensor parallelism the hyper-connections are whole on every rank (per token, the same input
    everywhere)."""

    def _hyper_connections(self, ctx: BuildContext) -> None:
        """attn_hc / ffn_hc from the config's hyper_connections (an error naming the architecture without them)."""
        from ..hyper_connections import HyperConnection

        cfg = ctx.cfg
        hc, D, eps = cfg.hyper_connections, cfg.hidden_size, cfg.rms_norm_eps
        if hc is None:
            raise ValueError(f"architecture {cfg.architecture}: its ModelConfig has no hyper_connections.")
        self.attn_hc = HyperConnection(hc, D, eps, ctx.device, ctx.kernels)
        self.ffn_hc = HyperConnection(hc, D, eps, ctx.device, ctx.kernels)

    @abstractmethod
    def norms(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """(the norm before the attention, the norm before the FFN block)."""

    def stages(self, positions_T: torch.Tensor, state: StreamState, input_ids_T: torch.Tensor | None,
               ctx: ForwardContext) -> Stages:
        attn_norm, ffn_norm = self.norms()
        x_TnD = state
        h_TD, mix = self.attn_hc.collapse(x_TnD)
        x_TnD = self.attn_hc.residual(x_TnD, self.mixer(positions_T, attn_norm(h_TD), ctx), mix)
        h_TD, mix = self.ffn_hc.collapse(x_TnD)
        y_TD = yield from ffn_stages(self.ffn, self.tp, ffn_norm(h_TD), input_ids_T)
        return self.ffn_hc.residual(x_TnD, y_TD, mix)

    @staticmethod
    def capture(aux: AuxCapture, n: int, state: StreamState) -> None:
        """The streams flat, [T, n D] (an MTP drafter conditions on them before the hyper-head)."""
        aux.take(n, state.flatten(1), None)


@RESIDUAL.register("hc_prenorm")
class HyperPreNormLayer(HyperConnectedLayer):
    """Hyper-connections (DeepSeek-V4's math, or with `comb` False Hunyuan Hy4's independent form), each behind its
    checkpoint's RMSNorm as the prenorm layer's (input_layernorm, post_attention_layernorm). GLM-5.3-Flash's; Hy4
    names its hyper-connection weights its own way (`hc_plan`, engine/models/hy_v4/kinds.py)."""

    def __init__(self, ctx: BuildContext, i: int, attention: AttentionKind, attn_cfg: LayerAttentionConfig,
                 ffn: Callable[[BuildContext, int], FFNBlock]):
        super().__init__(ctx)
        self._hyper_connections(ctx)
        cfg = ctx.cfg
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps, ctx.kernels, cfg.dtype, ctx.device)
        self.post_attention_layernorm = RMSNorm(D, eps, ctx.kernels, cfg.dtype, ctx.device)
        self.install(ctx, i, attention, attn_cfg, ffn)

    def norms(self):
        return self.input_layernorm, self.post_attention_layernorm

    def hc_plan(self, p: str) -> WeightPlan:
        """The two hyper-connections' weights: hc_attn_* / hc_ffn_* (as transformers' save_pretrained writes them)."""
        return {**self.attn_hc.weight_plan(p + "hc_attn"), **self.ffn_hc.weight_plan(p + "hc_ffn")}

    def weight_plan(self, p: str, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                    names: frozenset[str]) -> WeightPlan:
        plan = self.hc_plan(p)
        plan.update(self.input_layernorm.weight_plan(p + "input_layernorm.weight"))
        plan.update(self.post_attention_layernorm.weight_plan(p + "post_attention_layernorm.weight"))
        plan.update(self.mixer.weight_plan(f"{p}{self.mixer_name}."))
        plan.update(self.ffn.weight_plan(p, layer_idx, cfg, spec, expert_ids, names))
        return plan


__all__ = ["EMBEDDING", "HEAD", "Head", "HyperConnectedLayer", "HyperPreNormLayer", "Layer", "LayerClass", "PreNormLayer",
           "PreNormState", "RESIDUAL", "StreamState", "prenorm"]
