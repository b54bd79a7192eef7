"""LongCat-Flash's multi-token prediction (MTP) module as a speculative drafter (method "mtp"; MTP layout "longcat").

Legend: T tokens in the flat batch, D hidden, V vocab.

transformers 5.24 loads none of it (`_keys_to_ignore_on_load_unexpected = [r"model\\.mtp.*"]`) and its config names
no count; the release ships one module (vLLM's LongCatFlashMTP reads exactly one, the count config.json's
num_nextn_predict_layers where it has one: Architecture.mtp_unstated). Its tensors, as Meituan publishes them:
    model.mtp.embed_tokens.weight [V, D]                     its own embedding (the main model's where absent)
    model.mtp.layers.0.enorm.m.weight, hnorm.m.weight [D]    RMSNorms of the embedding and of the conditioning state
    model.mtp.layers.0.eh_proj.weight [D, 2D]                no bias
    model.mtp.layers.0.input_layernorm.weight, post_attention_layernorm.weight [D]
    model.mtp.layers.0.self_attn.*                           ONE MLA (q LoRA), shaped as a main sublayer's
    model.mtp.layers.0.transformer_layer.mlp.{gate,up,down}_proj.weight   a dense MLP of ffn_hidden_size
    model.mtp.norm.weight [D]                                the final norm
and the main model's LM head. Unlike a main layer (two sublayers, the shortcut-connected experts), the inner layer is
a plain pre-norm decoder layer with no experts (DeepSeek-V3's layer with n_routed_experts unset). For a token at
position t with conditioning state h_t (the main model's final-normed state) and the next token tok_{t+1}:
    x = eh_proj([enorm(emb(tok_{t+1})) | hnorm(h_t)]);  y, r = layer(x)
    out = norm(y + r);  logits(tok_{t+2}) = lm_head(out)
and `out` (final-normed) conditions the next chained draft. Its MLA carries the main layers' LoRA scales
(MLAConfig q_scale / latent_scale: LongCat's mla_scale_q_lora / mla_scale_kv_lora apply to every MLA of the model).
Its KV cache is one MLA cache layer at index num_hidden_layers (after the 2 * num_layers sublayers' caches).

Tensor parallelism (`tp`): the inner layer splits as a main sublayer does (heads, the MLP), the embedding and head
are vocab shards (the logits all-gathered), eh_proj is replicated (the same input on every rank).
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
from ...tp.group import TensorParallel
from ...tp.vocab import VocabShard
from ..blocks.mtp import MTP_LAYOUTS, MTPLayout
from ..layers import ForwardContext, RMSNorm
from ..linear import FloatLinear, Linear
from ..moe_decoder import layer_weight_plan, lone_layer
from ..rope import RotaryEmbedding

PREFIX = "model.mtp."
LAYER = PREFIX + "layers.0."
# The inner layer's plan names (model.layers.{L}.*) → the published ones: its MLP sits under transformer_layer.
_RENAMES = (("mlp.", "transformer_layer.mlp."),)


def longcat_mtp_checkpoint_names(cfg: ModelConfig, names: Collection[str]) -> list[str]:
    """The tensors of `names` under `model.mtp.`: read by the drafter only (the main model leaves them unread)."""
    return sorted(n for n in names if n.startswith(PREFIX))


class LongcatMTPLayer(nn.Module):
    """LongCat-Flash's MTP module (module docstring). `embed_tokens` / `lm_head`: the main model's (the embedding
    used where the checkpoint has no `model.mtp.embed_tokens.weight`)."""

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device,
                 ep: ExpertParallel | None = None, checkpoint_names: Collection[str] | None = None, *,
                 embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
                 tp: TensorParallel | None = None):
        super().__init__()
        if i != 0 or cfg.num_nextn_predict_layers < 1:
            raise ValueError(f"MTP layer {i} does not exist: LongCat-Flash publishes one MTP module (config.json "
                             f"num_nextn_predict_layers={cfg.num_nextn_predict_layers}).")
        if lm_head is None:
            raise ValueError("LongcatMTPLayer shares the main model's LM head: pass lm_head=...")
        self.cfg = cfg
        tp = tp if tp is not None and tp.size > 1 else None
        self.vocab = VocabShard(cfg.vocab_size, tp)
        self.layer_index = L = cfg.num_layers
        names = frozenset(checkpoint_names or ())
        dt, D, eps = cfg.dtype, cfg.hidden_size, cfg.rms_norm_eps
        self.own_embed = PREFIX + "embed_tokens.weight" in names
        if self.own_embed:  # zeros: under TP the last shard's rows past the vocabulary stay so (engine/tp/vocab.py)
            self.embed_tokens = nn.Parameter(torch.zeros(self.vocab.rows, D, dtype=dt, device=device),
                                             requires_grad=False)
        elif embed_tokens is None:
            raise ValueError(f"checkpoint has no {PREFIX}embed_tokens.weight: the MTP layer shares the main model's "
                             "embedding, so pass embed_tokens=...")
        else:
            self.embed_tokens = embed_tokens
        self.head = lm_head
        self.enorm = RMSNorm(D, eps, kernels, dt, device)
        self.hnorm = RMSNorm(D, eps, kernels, dt, device)
        self.eh_proj = Linear(2 * D, D, FloatLinear(), kernels, dt, device)
        self.norm = RMSNorm(D, eps, kernels, dt, device)
        # A plain pre-norm layer, MLA + dense MLP: not the main layers' shortcut pair, and no experts.
        self._spec = replace(spec, residual="prenorm", sublayers=1)
        self._layer_cfg = replace(cfg, sparse_layers=())
        self.moe_stats = MoEStats(0, cfg.num_experts, device)
        rope = RotaryEmbedding(cfg.attention.rope, cfg.hf_config, cfg.max_model_len, kernels, device)
        self.layer = lone_layer(self._layer_cfg, L, rope, kernels, device, ep, self.moe_stats, self._spec, tp=tp)

    def forward(self, positions_T: torch.Tensor, input_ids_T: torch.Tensor, hidden_TD: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """positions_T int64 [T]; input_ids_T int64 [T], the token after each conditioning state; hidden_TD [T, D],
        the conditioning states (h_t, or the previous draft's output). Writes and reads this layer's MLA cache
        (ctx.kv_caches[layer_index]). Returns the final-normed [T, D] (what `compute_logits` and the next chained
        draft read)."""
        return run_stages(self.stages(positions_T, input_ids_T, hidden_TD, ctx))

    def stages(self, positions_T, input_ids_T, hidden_TD, ctx: ForwardContext) -> Stages:
        e_TD = self.enorm(self.vocab.embed(input_ids_T, self.embed_tokens))
        x_TD = self.eh_proj(torch.cat([e_TD, self.hnorm(hidden_TD)], dim=-1))
        y_TD, residual_TD = yield from self.layer.stages(positions_T, (x_TD, None), None, ctx)
        out_TD, _ = self.norm.add_forward(y_TD, residual_TD)
        return out_TD

    def moe_only_stages(self) -> MoEOnlyStages:
        """No experts: nothing to join under expert parallelism."""
        yield from ()

    def compute_logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        """[T, V] logits of the token after the next, from `forward`'s (already normed) rows."""
        return self.vocab.logits(hidden_TD, self.head)

    def process_weights_after_loading(self) -> None:
        """The inner MLA's, as a main layer's (the LoRA scales folded, kv_b_proj split for absorption)."""
        for module in self.modules():
            if module is not self and hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()

    def weight_plan(self, checkpoint_names: Collection[str] | None = None) -> WeightPlan:
        """Checkpoint tensor name → destination, in the published names (module docstring)."""
        plan: WeightPlan = {**self.enorm.weight_plan(LAYER + "enorm.m.weight"),
                            **self.hnorm.weight_plan(LAYER + "hnorm.m.weight"),
                            **self.eh_proj.weight_plan(LAYER + "eh_proj.weight"),
                            **self.norm.weight_plan(PREFIX + "norm.weight")}
        if self.own_embed:
            plan[PREFIX + "embed_tokens.weight"] = self.vocab.plan_entry(self.embed_tokens)
        inner = f"model.layers.{self.layer_index}."
        for name, entry in layer_weight_plan(self.layer, self.layer_index, self._layer_cfg, self._spec, [],
                                             frozenset()).items():
            rest = name[len(inner):]
            for old, new in _RENAMES:
                rest = new + rest[len(old):] if rest.startswith(old) else rest
            plan[LAYER + rest] = entry
        return plan


def _build(cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device, ep: ExpertParallel | None = None,
           checkpoint_names=None, *, embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
           tp: TensorParallel | None = None) -> nn.Module:
    return LongcatMTPLayer(cfg, spec, i, kernels, device, ep, checkpoint_names, embed_tokens=embed_tokens,
                           lm_head=lm_head, tp=tp)


MTP_LAYOUTS.add("longcat", MTPLayout(_build, longcat_mtp_checkpoint_names))

__all__ = ["LAYER", "PREFIX", "LongcatMTPLayer", "longcat_mtp_checkpoint_names"]
