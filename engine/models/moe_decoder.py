"""The decoder, one definition for every architecture: embedding -> layers -> head, each part a block kind
looked up by name (engine/models/blocks/).

A layer is a residual kind (its class: "prenorm", or DeepSeek-V4's hyper-connections) around an attention kind
(ModelConfig.attention_for(layer).kind: "gqa", "mla", "linear", a family's own) and an FFN kind ("dense" outside
`sparse_layers`, else the architecture's own or "routed" / "routed_shared" by n_shared_experts: `ffn_kind`). The
model's embedding, head and checkpoint kinds are its ArchSpec's. ModelConfig holds every shape and routing fact;
the ArchSpec names the kinds and the checkpoint's weight names. A family that adds kinds registers them from its
own package (its kinds.py, imported at the first lookup: blocks/registry.py); this module names none.

Legend: T tokens in the flat batch, D hidden, V vocab, S sequences.
"""
from __future__ import annotations

from typing import Collection

import torch
from torch import nn

from moelink.moe.layer import ExpertParallel, MoEOnlyStages, Stages, run_stages
from moelink.moe.routing_capture import RoutingCapture
from moelink.moe.routing_replay import RoutingReplay, supports as replay_supports
from moelink.moe.stats import MoEStats
from moelink.moe.weight_plan import WeightPlan

from ..config.architectures import ArchSpec
from ..config.model import ModelConfig
from ..tp.group import TensorParallel
from ..tp.vocab import VocabShard
from .blocks.attention import ATTENTION
from .blocks.checkpoint import CHECKPOINT
from .blocks.context import BuildContext
from .blocks.ffn import FFN, SharedExpertsMoE, ffn_kind, fused_experts_name
from .blocks.stream import EMBEDDING, HEAD, RESIDUAL, Layer, PreNormLayer
from .layers import ForwardContext
from .rope import RotaryEmbedding


def build_layer(ctx: BuildContext, i: int, attn_cfg=None) -> Layer:
    """Layer `i` of ctx's model as its kinds say (`attn_cfg`: its attention config, default attention_for(i))."""
    cfg, spec = ctx.cfg, ctx.spec
    attn = cfg.attention_for(i) if attn_cfg is None else attn_cfg
    return RESIDUAL.get(spec.residual)(ctx, i, ATTENTION.get(attn.kind), attn, FFN.get(ffn_kind(cfg, spec, i)))


def lone_layer(cfg: ModelConfig, layer_idx: int, rope: RotaryEmbedding | None, kernels, device,
                 ep: ExpertParallel | None, stats: MoEStats, spec: ArchSpec | None = None, fused_experts: bool = False,
                 tp: TensorParallel | None = None) -> Layer:
    """One layer built alone, with its own rotary table (an MTP layer's inner layer: engine/spec/heads/mtp.py,
    qwen_mtp.py; a benchmark's). fused_experts: the checkpoint holds its experts fused (experts.gate_up_proj).
    tp: the rank's TensorParallel (None: no TP)."""
    spec = spec or ArchSpec(cfg.attention.kind, moe_prefix="mlp", expert_names=("gate_proj", "up_proj", "down_proj"))
    names = frozenset({fused_experts_name(layer_idx)}) if fused_experts else frozenset()
    ctx = BuildContext(cfg, spec, kernels, device, ep, stats, tp if tp is not None and tp.size > 1 else None, names,
                       rope_override=rope)
    return build_layer(ctx, layer_idx)


class MoEDecoderForCausalLM(nn.Module):
    """Embedding → decoder layers → head; `compute_logits` applies the LM head to chosen rows."""

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, kernels, device: torch.device,
                 ep: ExpertParallel | None = None, checkpoint_names: Collection[str] | None = None,
                 tp: TensorParallel | None = None):
        """checkpoint_names: the tensors the checkpoint holds (None = per-expert layout), read for the experts'
        on-disk layout per layer, as `weight_plan` reads it. tp: the rank's TensorParallel (None: no TP): the
        layers split over it, and the embedding and LM head are vocab-parallel (engine/tp/vocab.py)."""
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        if spec.attention != cfg.attention.kind:  # ModelConfig checks that every layer's is the model's kind
            raise ValueError(f"architecture {cfg.architecture} runs {spec.attention} attention, but its ModelConfig "
                             f"holds {cfg.attention.kind}.")
        self.cfg, self.spec = cfg, spec
        # Logical ids of the experts this rank holds, in local slot order (all of them without EP).
        self.expert_ids = list(range(cfg.num_experts)) if ep is None else list(ep.local_experts)
        self.moe_stats = MoEStats(len(cfg.sparse_layers), cfg.num_experts, device)
        # Vocab rows this rank holds: all, or its ceil(V / N) shard under TP (rows past V stay zero).
        self.vocab = VocabShard(cfg.vocab_size, self.tp)
        rows = self.vocab.rows
        self.embed_tokens = nn.Parameter(torch.zeros(rows, cfg.hidden_size, dtype=cfg.dtype, device=device),
                                         requires_grad=False)
        names = frozenset(checkpoint_names) if checkpoint_names is not None else frozenset()
        ctx = BuildContext(cfg, spec, kernels, device, ep, self.moe_stats, self.tp, names)
        self.embedding = EMBEDDING.get(spec.embedding)
        self.residual = RESIDUAL.get(spec.residual)
        self.layers = nn.ModuleList(build_layer(ctx, i) for i in range(cfg.num_layers))
        self.head_block = HEAD.get(spec.head)(ctx)
        for name, module in self.head_block.modules.items():
            setattr(self, name, module)
        head_dtype = (torch.float32 if self.head_block.lm_head_float32 and cfg.dtype.itemsize < 4  # Head's note
                      else cfg.dtype)
        self.lm_head = (
            self.embed_tokens if cfg.tie_word_embeddings and self.head_block.tieable
            else nn.Parameter(torch.zeros(rows, cfg.hidden_size, dtype=head_dtype, device=device), requires_grad=False)
        )
        # The head's bias where the head kind names one (Head.lm_head_bias_name): this rank's rows, as the head's.
        self.lm_head_bias = (nn.Parameter(torch.zeros(rows, dtype=head_dtype, device=device), requires_grad=False)
                             if self.head_block.lm_head_bias_name else None)
        self.checkpoint = CHECKPOINT.get(spec.checkpoint)
        # Per attention kind with per-sequence state, what it does around a verify step (blocks/attention.py).
        self.state_hooks = []
        self.routing_capture: RoutingCapture | None = None  # enable_routing_capture
        self._routing_replay: RoutingReplay | None = None  # routing_replay(), on a request's first given routing
        kinds = [cfg.attention_for(i).kind for i in range(cfg.num_layers)]
        for kind in dict.fromkeys(kinds):
            mixers = [layer.mixer for layer, k in zip(self.layers, kinds) if k == kind]
            hook = ATTENTION.get(kind).state_hook(mixers)
            if hook is not None:
                self.state_hooks.append(hook)
        for layer in self.layers:  # state a residual kind keeps beside its mixer's (Layer.state_hook)
            hook = layer.state_hook()
            if hook is not None:
                self.state_hooks.append(hook)

    def forward(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Returns the final-normed hidden states [T, D]."""
        return run_stages(self.stages(input_ids_T, positions_T, ctx))

    def stages(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> Stages:
        """`forward` as stages: yields twice per MoE layer under expert parallelism (dispatch in flight, combine
        in flight), never otherwise; returns the final-normed hidden states [T, D]. engine/rank/step_plan.py drives
        it, alone or interleaved with another micro-batch's. With `ctx.aux` it also keeps the residual stream
        after the layers the capture names (an EAGLE-3 drafter's states, an MTP drafter's: no sync)."""
        for hook in self.state_hooks:  # a verify step: what its drafts may overwrite, kept first
            hook.before(ctx, positions_T)
        x_TD = self.vocab.embed(input_ids_T, self.embed_tokens)
        if ctx.images is not None:  # a multimodal step: the vision tower's rows over the image placeholders
            x_TD = ctx.images.splice(x_TD)
        state = self.embedding(self.cfg, x_TD)
        aux = ctx.aux  # a drafter's capture (models/layers.AuxCapture); None: the normal path, untouched
        for i, layer in enumerate(self.layers):
            if aux is not None:
                self.residual.capture(aux, i, state)
            state = yield from layer.stages(positions_T, state, input_ids_T, ctx)
        if aux is not None:
            self.residual.capture(aux, len(self.layers), state)
        return self.head_block.finish(state)

    def enable_routing_capture(self) -> RoutingCapture:
        """Every MoE layer writes its routed ids into one RoutingCapture from now on (moe/routing_capture.py:
        `--enable-return-routed-experts`); call before warm-up and graph capture."""
        moes = [layer.moe for layer in self.layers if layer.moe is not None]
        if not moes:
            raise ValueError(f"enable_return_routed_experts is invalid for {self.cfg.architecture}: it has no MoE "
                             "layers.")
        capture = RoutingCapture(max(m.moe_index for m in moes) + 1, moes[0].router.top_k,
                                 self.embed_tokens.device)
        for m in moes:
            m.routing_capture = capture
        self.routing_capture = capture
        return capture

    def routing_replay(self) -> RoutingReplay:
        """The MoE layers' shared RoutingReplay (moe/routing_replay.py), made on first use: the runner gives it each
        step's given ids. ValueError naming why when a layer's router cannot replay (DeepSeek-V4's hash and
        sqrt-softplus routers: no MoE layer of moe/layer.py)."""
        if self._routing_replay is None:
            moes = [layer.moe for layer in self.layers if layer.moe is not None]
            if not moes or not all(replay_supports(m.router) for m in moes):
                raise ValueError(f"SamplingParams.forced_routed_experts is not supported for {self.cfg.architecture}: "
                                 "its MoE layers have no replayable router.")
            self._routing_replay = RoutingReplay(max(m.moe_index for m in moes) + 1)
            for m in moes:
                m.routing_replay = self._routing_replay
        return self._routing_replay

    def begin_routing_replay(self, forced_LTK: torch.Tensor | None) -> None:
        """A forward of a new step starts with these given ids [L, T, K] (None: none); nothing before any request
        gave routing."""
        if self._routing_replay is not None:
            self._routing_replay.begin_step(forced_LTK)

    def begin_routing_capture(self) -> None:
        """A forward of a new step starts (its rows written from 0); nothing without the capture."""
        if self.routing_capture is not None:
            self.routing_capture.begin_step()

    def set_valid_rows(self, valid_T: torch.Tensor | None) -> None:
        """Mark which rows of the coming forward are real (bool [T]); the MoE layers route the others to
        no expert. None (the default) = every row is real. Used by padded decode graphs."""
        if valid_T is not None and any(layer.moe is not None and layer.ffn.refuses_padding_rows
                                       for layer in self.layers):
            raise ValueError("set_valid_rows is invalid under expert parallelism with this all-to-all: padded rows "
                             "dispatch only on the fixed-capacity backends (torch_padded, nccl).")
        for layer in self.layers:
            if layer.moe is not None:
                layer.moe.valid_rows_T = valid_T

    def forward_moe_only(self) -> None:
        """An empty step under expert parallelism: no local tokens, but this rank still
        joins every MoE layer's dispatch and combine, in the same order as its peers (shared experts, which
        are local, have nothing to do)."""
        run_stages(self.moe_only_stages())

    def moe_only_stages(self) -> MoEOnlyStages:
        """`forward_moe_only` as stages: the same yields as `stages` (an empty micro-batch of a two-batch step
        runs this, so its rank issues the same collectives as its peers); returns None."""
        x_0D = self.embed_tokens.new_zeros(0, self.cfg.hidden_size)
        for layer in self.layers:
            if layer.moe is not None:
                yield from layer.ffn.moe_only_stages(x_0D)

    def process_weights_after_loading(self, updated: set[int] | None = None) -> None:
        """After the loader filled every parameter (or a weight update the ones whose ids `updated` holds): what the
        checkpoint kind does with them (blocks/checkpoint.py)."""
        self.checkpoint.after_load(self.cfg, self, updated)

    def replay_states(self, num_accepted_S: torch.Tensor) -> None:
        """After a verify step's sampling: the layers with per-sequence state (gated DeltaNet's, DeepSeek-V4's
        rings) back to their verifying sequences' accepted tokens; num_accepted_S in the verify group's order."""
        for hook in self.state_hooks:
            hook.replay(num_accepted_S)

    def compute_logits(self, h_SD: torch.Tensor) -> torch.Tensor:
        """[S, V] on every rank (under TP each rank's vocab shard, all-gathered: every rank samples the same)."""
        if h_SD.dtype != self.lm_head.dtype:  # a float32 head: Head.lm_head_float32
            h_SD = h_SD.to(self.lm_head.dtype)
        logits_SV = self.vocab.logits(h_SD, self.lm_head, self.lm_head_bias)
        cap = self.head_block.logit_softcap  # Head.logit_softcap (Gemma 4), in the logits' dtype as transformers
        return logits_SV if cap is None else torch.tanh(logits_SV / cap) * cap

    # -- checkpoint mapping ---------------------------------------------------
    def weight_plan(self, checkpoint_names: Collection[str] | None = None) -> WeightPlan:
        """Checkpoint tensor name → (destination parameter, index into it[, index into the tensor]).

        Only tensors this rank needs are listed, so a loader that follows the plan never reads another rank's
        experts (in the fused layout it skips their rows when this rank's experts are contiguous). Experts come in
        one of two on-disk layouts, chosen per layer from `checkpoint_names` (None = per-expert: blocks/ffn.py);
        the checkpoint kind renames and converts last (blocks/checkpoint.py)."""
        cfg = self.cfg
        names = frozenset(checkpoint_names) if checkpoint_names is not None else frozenset()
        plan: WeightPlan = {"model.embed_tokens.weight": self.vocab.plan_entry(self.embed_tokens)}
        if self.lm_head is not self.embed_tokens:
            plan[self.head_block.lm_head_name] = self.vocab.plan_entry(self.lm_head)
        if self.lm_head_bias is not None:
            plan[self.head_block.lm_head_bias_name] = self.vocab.plan_entry(self.lm_head_bias)
        plan.update(self.head_block.weight_plan())
        for i, layer in enumerate(self.layers):
            plan.update(layer.weight_plan(f"model.layers.{i}.", i, cfg, self.spec, self.expert_ids, names))
        return self.checkpoint.plan(cfg, self.spec, plan, names)


def layer_weight_plan(layer: Layer, layer_idx: int, cfg: ModelConfig, spec: ArchSpec, expert_ids: list[int],
                      names: frozenset[str]) -> WeightPlan:
    """The plan of one decoder layer under `model.layers.{layer_idx}.` (an MTP layer's inner layer: mtp.py)."""
    return layer.weight_plan(f"model.layers.{layer_idx}.", layer_idx, cfg, spec, expert_ids, names)


__all__ = ["MoEDecoderForCausalLM", "PreNormLayer", "SharedExpertsMoE", "build_layer", "lone_layer",
           "fused_experts_name", "layer_weight_plan"]
