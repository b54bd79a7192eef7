"""Qwen3-Next's and Qwen3.5-MoE's multi-token prediction (MTP) module as a speculative drafter (method "mtp").

Legend: T tokens in the flat batch, D hidden, V vocab.

Both families publish `mtp_num_hidden_layers` modules (one in every release) beside the main model, under a layout
of their own (not DeepSeek's `model.layers.{L}.*`, engine/spec/heads/mtp.py): the tensors sit at the checkpoint's top
level, outside the text model's prefix (so a Qwen3.5 multimodal checkpoint keeps them at `mtp.*` too):
    mtp.pre_fc_norm_embedding.weight, mtp.pre_fc_norm_hidden.weight [D]   zero-centred RMSNorms (weight + 1)
    mtp.fc.weight [D, 2D]                                                  no bias
    mtp.layers.{i}.*   one gated full-attention decoder layer, exactly a main full-attention layer's tensors
                       (q/k norms, the output gate inside q_proj, the MoE with its gated shared expert)
    mtp.norm.weight [D]                                                    the final norm (zero-centred)
The embedding and the LM head are the main model's (no copies).

For a token at position t with conditioning state h_t (the main model's final-normed hidden state) and the next
token tok_{t+1} (vLLM's and SGLang's qwen3_next_mtp, the order of the concatenation included):
    x = fc([pre_fc_norm_embedding(emb(tok_{t+1})) | pre_fc_norm_hidden(h_t)]);  y, r = layer(x)
    out = norm(y + r);  logits(tok_{t+2}) = lm_head(out)
and `out` (final-normed, unlike DeepSeek's pre-norm state) conditions the next chained draft. transformers loads
none of it (`_keys_to_ignore_on_load_unexpected = ["^mtp.*"]`).

The inner layer is the main decoder's layer, built alone (`moe_decoder.lone_layer`) at index num_hidden_layers: its
attention is the model's full-attention config (`ModelConfig.attention_for` past the main layers), its KV cache `ctx.kv_caches[L]` (the
drafter's cache layer, engine/spec/proposer/chain.py), and it keeps no linear-attention state. Its MLP is routed
when the main layer 0 is (vLLM builds it with layer index 0 for `mlp_only_layers` / `decoder_sparse_step`).

Tensor parallelism (`tp`): the inner layer is built with the same TP strategy objects as a main layer (heads split,
the gated output with them, experts split or in EP), the embedding and head are the main model's vocab shards (the
logits all-gathered: every rank takes the same greedy draft), and fc is replicated: its input is the same on every
rank, so each computes the whole [T, D] projection (no collective for one D x 2D matrix).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Collection

import torch
from torch import nn

from moelink.moe.layer import ExpertParallel, MoEOnlyStages, Stages, run_stages
from moelink.moe.stats import MoEStats
from moelink.moe.weight_plan import WeightPlan

from ...config.architectures import ArchSpec
from ...config.model import ModelConfig
from ...models.layers import ForwardContext, RMSNorm
from ...models.linear import FloatLinear, Linear
from ...models.moe_decoder import fused_experts_name, layer_weight_plan, lone_layer
from ...models.rope import RotaryEmbedding
from ...tp.group import TensorParallel
from ...tp.vocab import VocabShard

PREFIX = "mtp."


def qwen_mtp_checkpoint_names(names: Collection[str]) -> list[str]:
    """The tensors of `names` that belong to the MTP modules (`mtp.*`): read by the drafter only."""
    return sorted(n for n in names if n.startswith(PREFIX))


class QwenMTPLayer(nn.Module):
    """MTP module `i` of a Qwen3-Next / Qwen3.5-MoE checkpoint (module docstring). `embed_tokens` / `lm_head`: the
    main model's (MoEDecoderForCausalLM's); `checkpoint_names` decides the experts' on-disk layout."""

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device,
                 ep: ExpertParallel | None = None, checkpoint_names: Collection[str] | None = None, *,
                 embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None, tp: TensorParallel | None = None):
        super().__init__()
        if not 0 <= i < cfg.num_nextn_predict_layers:
            raise ValueError(f"MTP layer {i} does not exist: config.json mtp_num_hidden_layers="
                             f"{cfg.num_nextn_predict_layers}.")
        if embed_tokens is None or lm_head is None:
            raise ValueError("QwenMTPLayer shares the main model's embedding and LM head: pass embed_tokens=... and "
                             "lm_head=... (the checkpoint holds no MTP copies).")
        self.cfg, self.spec = cfg, spec
        tp = tp if tp is not None and tp.size > 1 else None
        self.vocab = VocabShard(cfg.vocab_size, tp)  # the main model's shards of its embedding and head under TP
        self.layer_index = L = cfg.num_layers + i  # its KV cache layer, after the main ones
        self.prefix = f"{PREFIX}layers.{i}."
        self.expert_ids = list(range(cfg.num_experts)) if ep is None else list(ep.local_experts)
        dt, D, eps = cfg.dtype, cfg.hidden_size, cfg.rms_norm_eps
        self.embed_tokens, self.head = embed_tokens, lm_head
        self.pre_fc_norm_embedding = RMSNorm(D, eps, kernels, dt, device)
        self.pre_fc_norm_hidden = RMSNorm(D, eps, kernels, dt, device)
        self.fc = Linear(2 * D, D, FloatLinear(), kernels, dt, device)
        self.norm = RMSNorm(D, eps, kernels, dt, device)
        sparse = 0 in cfg.sparse_layers
        layer_cfg = replace(cfg, sparse_layers=(L,) if sparse else ())
        self.moe_stats = MoEStats(1 if sparse else 0, cfg.num_experts, device)
        rope = RotaryEmbedding(cfg.attention.rope, cfg.hf_config, cfg.max_model_len, kernels, device)
        # The checkpoint names as the inner layer's plan spells them (model.layers.{L}.*): the experts' layout.
        self._names = frozenset(self._as_layer_name(n) for n in (checkpoint_names or ()))
        self.layer = lone_layer(layer_cfg, L, rope, kernels, device, ep, self.moe_stats, spec,
                                  fused_experts=fused_experts_name(L) in self._names, tp=tp)
        if self.layer.mixer_name != "self_attn":
            raise ValueError(f"{cfg.architecture}'s MTP layer must run full attention (its model attention is "
                             f"{cfg.attention.kind!r}).")
        self._layer_cfg = layer_cfg

    def _as_layer_name(self, name: str) -> str:
        p = self.prefix
        return f"model.layers.{self.layer_index}." + name[len(p):] if name.startswith(p) else name

    def forward(self, positions_T: torch.Tensor, input_ids_T: torch.Tensor, hidden_TD: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """positions_T int64 [T]; input_ids_T int64 [T], the token after each conditioning state; hidden_TD [T, D],
        the conditioning states (h_t, or the previous draft's output). Writes and reads this layer's K/V
        (ctx.kv_caches[layer_index]). Returns the final-normed [T, D] (what `compute_logits` and the next chained
        draft read)."""
        return run_stages(self.stages(positions_T, input_ids_T, hidden_TD, ctx))

    def stages(self, positions_T, input_ids_T, hidden_TD, ctx: ForwardContext) -> Stages:
        """`forward` as stages: yields while its MoE all-to-all is in flight (under expert parallelism)."""
        e_TD = self.pre_fc_norm_embedding(self.vocab.embed(input_ids_T, self.embed_tokens))
        x_TD = self.fc(torch.cat([e_TD, self.pre_fc_norm_hidden(hidden_TD)], dim=-1))
        y_TD, residual_TD = yield from self.layer.stages(positions_T, (x_TD, None), None, ctx)
        out_TD, _ = self.norm.add_forward(y_TD, residual_TD)
        return out_TD

    def moe_only_stages(self) -> MoEOnlyStages:
        """A rank with no draft tokens under expert parallelism still joins this layer's dispatch and combine."""
        if self.layer.moe is not None:
            yield from self.layer.moe.stages(self.embed_tokens.new_zeros(0, self.cfg.hidden_size))

    def compute_logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        """[T, V] logits of the token after the next, from `forward`'s (already normed) rows (gathered over a TP
        group: the same on every rank)."""
        return self.vocab.logits(hidden_TD, self.head)

    def process_weights_after_loading(self) -> None:
        """As MoEDecoderForCausalLM's: the zero-centred norms (ModelConfig.norm_weight_offset) become plain ones."""
        if self.cfg.norm_weight_offset:
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight.add_(self.cfg.norm_weight_offset)
        for module in self.modules():
            if module is not self and hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()

    def weight_plan(self, checkpoint_names: Collection[str] | None = None) -> WeightPlan:
        """Checkpoint tensor name → destination, this module's tensors only (the embedding and head are the main
        model's plan)."""
        names = (frozenset(self._as_layer_name(n) for n in checkpoint_names) if checkpoint_names is not None
                 else self._names)
        plan: WeightPlan = {**self.pre_fc_norm_embedding.weight_plan(PREFIX + "pre_fc_norm_embedding.weight"),
                            **self.pre_fc_norm_hidden.weight_plan(PREFIX + "pre_fc_norm_hidden.weight"),
                            **self.fc.weight_plan(PREFIX + "fc.weight"),
                            **self.norm.weight_plan(PREFIX + "norm.weight")}
        inner = f"model.layers.{self.layer_index}."
        for name, entry in layer_weight_plan(self.layer, self.layer_index, self._layer_cfg, self.spec,
                                             self.expert_ids, names).items():
            plan[self.prefix + name[len(inner):]] = entry
        return plan


__all__ = ["PREFIX", "QwenMTPLayer", "qwen_mtp_checkpoint_names"]
