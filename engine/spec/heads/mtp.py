"""The checkpoint's next-n prediction (MTP) layers as a speculative drafter (DeepSeek-V3/R1, Kimi K2, GLM-4.5).

Legend: T tokens in the flat batch, D hidden, V vocab.

DeepSeek-V3's report (sec. 2.2) trains `num_nextn_predict_layers` modules after the main layers; checkpoints
store module i as `model.layers.{num_hidden_layers + i}.*`:
    embed_tokens.weight [V, D]        (may be absent: the main model's embedding)
    enorm.weight, hnorm.weight [D]    RMSNorms of the token embedding and of the conditioning hidden state
    eh_proj.weight [D, 2D]            float (FP8 only where the checkpoint ships its weight_scale_inv)
    self_attn.*, input_layernorm, post_attention_layernorm, mlp.*   one decoder layer, exactly as a main
                                      layer (MoE with shared experts, FP8 scales in FP8 checkpoints)
    shared_head.norm.weight [D], shared_head.head.weight [V, D]   (head may be absent: the main lm_head)

For a token at position t with conditioning hidden state h_t and the next token tok_{t+1}:
    x = eh_proj([enorm(emb(tok_{t+1})) | hnorm(h_t)]);  y = decoder_layer(x) + its residual
    logits(tok_{t+2}) = head(shared_head.norm(y))
and y conditions the next chained draft (as h did). The inner layer is the main decoder's layer, built alone
(`moe_decoder.lone_layer`) at index num_hidden_layers + i, so its checkpoint names and its KV cache (`ctx.kv_caches[num_hidden_layers + i]`)
follow from that index; it counts its routed experts in a MoEStats of its own (one row), not the main model's.

What the caller decides (none of it is fixed by the weights): which h_t (the report's figure feeds the main
model's last-layer output before its final norm; vLLM and SGLang feed the final-normed one) and which positions
(vLLM's drafter reuses the main model's position t of h_t, with the token ids shifted by one). The engine's
drafter (engine/spec/proposer/mtp.py) takes the final-normed state and vLLM's positions.

Tensor parallelism (`tp`, engine/tp/group.py): the inner layer is built with the same TP strategy objects as
a main layer (attention heads split, dense MLP / experts split or in EP, row-parallel all-reduces), the embedding
and head are vocab-parallel like the main model's (its shards, or the layer's own tables read as shards:
engine/tp/vocab.py; the logits are all-gathered, so every rank takes the same greedy draft), and eh_proj is
replicated: its input, [enorm(embedding) | hnorm(h)], is the same on every rank after the embedding's all-reduce,
so each rank computes the whole [T, D] projection itself (no collective; it is one D x 2D matrix beside the
layer's experts).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Collection

import torch
from torch import nn

from moelink.moe.layer import ExpertParallel, MoEOnlyStages, Stages, run_stages
from moelink.moe.stats import MoEStats
from moelink.moe.weight_plan import WeightPlan

from ...config.architectures import MTP_LAYOUTS as BUILT_IN_LAYOUTS, REGISTRY, ArchSpec
from ...config.model import ModelConfig
from ...models.blocks.mtp import MTP_LAYOUTS
from ...models.layers import ForwardContext, RMSNorm
from ...models.linear import FloatLinear, Linear, linear_method
from ...models.moe_decoder import fused_experts_name, layer_weight_plan, lone_layer
from ...models.rope import RotaryEmbedding
from ...tp.group import TensorParallel
from ...tp.vocab import VocabShard
from .qwen_mtp import QwenMTPLayer, qwen_mtp_checkpoint_names


def mtp_layer_index(cfg: ModelConfig, i: int) -> int:
    """The checkpoint layer index of MTP module i (0-based): after the main layers."""
    if not 0 <= i < cfg.num_nextn_predict_layers:
        raise ValueError(f"MTP layer {i} does not exist: config.json num_nextn_predict_layers="
                         f"{cfg.num_nextn_predict_layers}.")
    return cfg.num_layers + i


def mtp_checkpoint_names(cfg: ModelConfig, names: Collection[str]) -> list[str]:
    """The tensors of `names` that belong to the MTP layers (`model.layers.{num_layers + i}.`, or `mtp.*` in the
    Qwen layout): read by a drafter only; the main model's loader leaves them unread."""
    layout = REGISTRY[cfg.architecture].mtp_layout
    if cfg.num_nextn_predict_layers and layout == "qwen":
        return qwen_mtp_checkpoint_names(names)
    if layout not in BUILT_IN_LAYOUTS:  # a family's own layout (engine/models/blocks/mtp.py; unregistered: an error)
        return MTP_LAYOUTS.get(layout).checkpoint_names(cfg, names)
    prefixes = tuple(f"model.layers.{cfg.num_layers + i}." for i in range(cfg.num_nextn_predict_layers))
    return sorted(n for n in names if n.startswith(prefixes))


def make_mtp_layer(cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device,
                   ep: ExpertParallel | None = None, checkpoint_names: Collection[str] | None = None, *,
                   embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
                   tp: TensorParallel | None = None) -> nn.Module:
    """MTP module i in the architecture's layout (architectures.Architecture.mtp_layout): MTPLayer (DeepSeek's
    next-n layers), QwenMTPLayer (Qwen3-Next / Qwen3.5's `mtp.*`) or a family's own layout's (engine/models/blocks/
    mtp.py: DeepSeek-V4's `mtp.{i}.*`, over the hyper-connection streams, which its drafter adapts,
    engine/spec/proposer/mtp.py); all have compute_logits,
    moe_only_stages, weight_plan, layer_index. `tp`: the rank's TensorParallel (each module splits over it as its main
    layers do)."""
    layout = REGISTRY[cfg.architecture].mtp_layout
    if layout not in BUILT_IN_LAYOUTS:
        return MTP_LAYOUTS.get(layout).build(cfg, spec, i, kernels, device, ep, checkpoint_names,
                                             embed_tokens=embed_tokens, lm_head=lm_head, tp=tp)
    if layout == "qwen":
        return QwenMTPLayer(cfg, spec, i, kernels, device, ep, checkpoint_names, embed_tokens=embed_tokens,
                            lm_head=lm_head, tp=tp)
    return MTPLayer(cfg, spec, i, kernels, device, ep, checkpoint_names, embed_tokens=embed_tokens, lm_head=lm_head,
                    tp=tp)


class MTPLayer(nn.Module):
    """One next-n prediction module (module docstring). `embed_tokens` / `lm_head`: the main model's
    (MoEDecoderForCausalLM.embed_tokens / .lm_head), used where the checkpoint has no MTP copy of its own;
    `checkpoint_names` decides that, and the experts' on-disk layout, as for the main model. `tp`: the rank's
    TensorParallel or None (module docstring): the shared tables are then the main model's vocab shards."""

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device,
                 ep: ExpertParallel | None = None, checkpoint_names: Collection[str] | None = None, *,
                 embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None, tp: TensorParallel | None = None):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        tp = tp if tp is not None and tp.size > 1 else None
        self.vocab = VocabShard(cfg.vocab_size, tp)  # every row, or this rank's ceil(V / N) under TP
        self.layer_index = L = mtp_layer_index(cfg, i)
        self.prefix = p = f"model.layers.{L}."
        names = frozenset(checkpoint_names) if checkpoint_names is not None else frozenset()
        self.expert_ids = list(range(cfg.num_experts)) if ep is None else list(ep.local_experts)
        dt, D, V = cfg.dtype, cfg.hidden_size, self.vocab.rows
        self.own_embed, self.own_head = p + "embed_tokens.weight" in names, p + "shared_head.head.weight" in names
        self.embed_tokens = self._table("embed_tokens", self.own_embed, embed_tokens, V, D, device)
        self.head = self._table("shared_head.head", self.own_head, lm_head, V, D, device)
        self.enorm = RMSNorm(D, cfg.rms_norm_eps, kernels, dt, device)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps, kernels, dt, device)
        # Published float (DeepSeek's FP8 release keeps eh_proj bf16, beside the embedding and head); FP8 only
        # when the checkpoint says so by shipping the scale.
        fp8 = p + "eh_proj.weight_scale_inv" in names
        self.eh_proj = Linear(2 * D, D, linear_method(cfg.quantization, p + "eh_proj") if fp8 else FloatLinear(),
                              kernels, dt, device)
        self.shared_head_norm = RMSNorm(D, cfg.rms_norm_eps, kernels, dt, device)
        # transformers' rule for every DeepSeek-style layer: routed experts from first_k_dense_replace on. The
        # layer's config names it as its only sparse layer, so its MoE counts in row 0 of its own stats.
        sparse = cfg.num_experts > 0 and L >= cfg.moe.first_k_dense_replace
        layer_cfg = replace(cfg, sparse_layers=(L,) if sparse else ())
        self.moe_stats = MoEStats(1 if sparse else 0, cfg.num_experts, device)
        rope = RotaryEmbedding(cfg.attention.rope, cfg.hf_config, cfg.max_model_len, kernels, device)
        self.layer = lone_layer(layer_cfg, L, rope, kernels, device, ep, self.moe_stats, spec,
                                  fused_experts=fused_experts_name(L) in names, tp=tp)
        self._layer_cfg = layer_cfg

    def _table(self, name: str, own: bool, shared: torch.Tensor | None, V: int, D: int, device) -> torch.Tensor:
        """A [V, D] table of this layer's own (the checkpoint has `{prefix}{name}.weight`) or the main model's."""
        if own:  # zeros: under TP the last shard's rows past the vocabulary stay so (engine/tp/vocab.py)
            return nn.Parameter(torch.zeros(V, D, dtype=self.cfg.dtype, device=device), requires_grad=False)
        if shared is None:
            raise ValueError(f"checkpoint has no {self.prefix}{name}.weight: the MTP layer shares the main model's, "
                             f"so pass it ({'embed_tokens' if name == 'embed_tokens' else 'lm_head'}=...).")
        return shared

    def forward(self, positions_T: torch.Tensor, input_ids_T: torch.Tensor, hidden_TD: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """positions_T int64 [T]; input_ids_T int64 [T], the token after each conditioning state (tok_{t+1});
        hidden_TD [T, D] in the model dtype, the conditioning states (h_t, or the previous draft's output).
        Writes this layer's K/V (ctx.kv_caches[layer_index], at ctx.attn's slots) and attends over its cache.
        Returns [T, D]: the layer's output before shared_head.norm (`compute_logits` applies it); it
        conditions the next chained draft."""
        return run_stages(self.stages(positions_T, input_ids_T, hidden_TD, ctx))

    def stages(self, positions_T, input_ids_T, hidden_TD, ctx: ForwardContext) -> Stages:
        """`forward` as stages: yields while its MoE all-to-all is in flight (under expert parallelism)."""
        e_TD = self.enorm(self.vocab.embed(input_ids_T, self.embed_tokens))
        x_TD = self.eh_proj(torch.cat([e_TD, self.hnorm(hidden_TD)], dim=-1))
        y_TD, residual_TD = yield from self.layer.stages(positions_T, (x_TD, None), None, ctx)
        return y_TD + residual_TD

    def moe_only_stages(self) -> MoEOnlyStages:
        """A rank with no draft tokens under expert parallelism still joins this layer's dispatch and combine
        (as MoEDecoderForCausalLM.moe_only_stages); nothing for a dense MTP layer."""
        if self.layer.moe is not None:
            yield from self.layer.moe.stages(self.embed_tokens.new_zeros(0, self.cfg.hidden_size))

    def compute_logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        """[T, V] logits of the token after the next, from `forward`'s output rows (the same on every TP rank)."""
        return self.vocab.logits(self.shared_head_norm(hidden_TD), self.head)

    def process_weights_after_loading(self) -> None:
        """As MoEDecoderForCausalLM's: an FP8 kv_b_proj is dequantized for MLA's absorption."""
        for module in self.modules():
            if module is not self and hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()

    def weight_plan(self, checkpoint_names: Collection[str] | None = None) -> WeightPlan:
        """Checkpoint tensor name → destination, for this layer's tensors only (the shared embedding and head
        are the main model's plan); `checkpoint_names` picks the experts' layout, as the main model's plan."""
        names = frozenset(checkpoint_names) if checkpoint_names is not None else frozenset()
        p = self.prefix
        plan: WeightPlan = {**self.enorm.weight_plan(p + "enorm.weight"), **self.hnorm.weight_plan(p + "hnorm.weight"),
                            **self.eh_proj.weight_plan(p + "eh_proj.weight"),
                            **self.shared_head_norm.weight_plan(p + "shared_head.norm.weight")}
        if self.own_embed:
            plan[p + "embed_tokens.weight"] = self.vocab.plan_entry(self.embed_tokens)
        if self.own_head:
            plan[p + "shared_head.head.weight"] = self.vocab.plan_entry(self.head)
        plan.update(layer_weight_plan(self.layer, self.layer_index, self._layer_cfg, self.spec, self.expert_ids, names))
        return plan
