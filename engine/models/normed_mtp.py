"""A next-n prediction (MTP) module whose output is final-normed: the shared shape of the families' own MTP layouts
(engine/models/blocks/mtp.py registers them: LongCat-Flash's, Ling hybrid's, Hy4's, GLM-5.3-Flash's; Qwen3-Next's
and Qwen3.5's `mtp.*`, engine/spec/heads/qwen_mtp.py), built from the main decoder's layer.

Legend: T tokens in the flat batch, D hidden, V vocab.

For a token at position t with conditioning state h_t (the main model's final-normed state) and the next token
tok_{t+1}:
    x = eh_proj([enorm(emb(tok_{t+1})) | hnorm(h_t)]);  y, r = layer(x)
    out = norm(y + r);  logits(tok_{t+2}) = head(out)
and `out` (final-normed, as vLLM's LongCat and Bailing-V3 MTP modules return it) conditions the next chained draft.
DeepSeek-V3's module (engine/spec/heads/mtp.py) differs only there: it chains the state before its shared_head.norm.
What a family decides (`MTPNames`): the checkpoint names of the five module tensors, whether it ships its own
embedding or head (read where the checkpoint has them, else the main model's), whether the row at position 0 reads a
zero embedding (`mask_position0`: vLLM's Hy4 and GLM-5.3-Flash modules zero it, as its DeepSeek module does), the
inner layer's spec and config (its residual kind, dense or routed MLP) and how the inner layer's planned names
(`model.layers.{L}.*`) are published.

The inner layer is `moe_decoder.lone_layer` at index L = num_hidden_layers + index (its KV cache `ctx.kv_caches[L]`, the
drafter's cache layer, engine/spec/proposer/chain.py); its routed experts count in a MoEStats of its own. Under
tensor parallelism it splits as a main layer does, the embedding and head are vocab shards (logits all-gathered),
and eh_proj is replicated (its input is the same on every rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection

import torch
from torch import nn

from moelink.moe.layer import ExpertParallel, MoEOnlyStages, Stages, run_stages
from moelink.moe.stats import MoEStats
from moelink.moe.weight_plan import WeightPlan

from ..config.architectures import ArchSpec
from ..config.model import ModelConfig
from ..tp.group import TensorParallel
from ..tp.vocab import VocabShard
from .blocks.checkpoint import CHECKPOINT
from .layers import ForwardContext, RMSNorm
from .linear import FloatLinear, Linear, linear_method
from .moe_decoder import fused_experts_name, layer_weight_plan, lone_layer
from .rope import RotaryEmbedding


@dataclass(frozen=True)
class MTPNames:
    """A family's checkpoint names for its MTP module: the norms', eh_proj's, the final norm's; `embed` / `head`
    its own copies where published (None: always the main model's); `publish` maps an inner-layer plan name
    (`model.layers.{L}.<rest>`) to the published one; `mask_position0`: the token embedding of a row at position 0
    is zeroed before enorm (the module's definition in vLLM for Hy4 and GLM-5.3-Flash)."""

    enorm: str
    hnorm: str
    eh_proj: str
    norm: str
    embed: str | None
    head: str | None
    publish: Callable[[str], str]
    mask_position0: bool = False

    def __post_init__(self) -> None:
        for field in ("enorm", "hnorm", "eh_proj", "norm"):
            if not getattr(self, field):
                raise ValueError(f"MTPNames.{field} is empty: name the checkpoint tensor.")


class NormedMTPLayer(nn.Module):
    """One MTP module (module docstring). `layer_spec` / `layer_cfg`: the inner layer's (a family's residual kind
    or MLP may differ from its main layers'); `checkpoint_names` decides the own tables and the experts' layout."""

    def __init__(self, cfg: ModelConfig, names: MTPNames, layer_spec: ArchSpec, layer_cfg: ModelConfig, kernels,
                 device: torch.device, ep: ExpertParallel | None, checkpoint_names: Collection[str] | None, *,
                 embed_tokens: torch.Tensor | None, lm_head: torch.Tensor | None, tp: TensorParallel | None,
                 index: int = 0):
        """`index`: which of the checkpoint's modules (its inner layer and KV cache layer num_hidden_layers + index)."""
        super().__init__()
        if not 0 <= index < cfg.num_nextn_predict_layers:
            raise ValueError(f"{cfg.architecture} has no MTP module {index}: config.json counts "
                             f"{cfg.num_nextn_predict_layers} (num_nextn_predict_layers / mtp_num_hidden_layers).")
        self.cfg, self.names, self._spec, self._layer_cfg = cfg, names, layer_spec, layer_cfg
        tp = tp if tp is not None and tp.size > 1 else None
        self.vocab = VocabShard(cfg.vocab_size, tp)
        self.layer_index = L = cfg.num_layers + index
        ckpt = frozenset(checkpoint_names or ())
        self.expert_ids = list(range(cfg.num_experts)) if ep is None else list(ep.local_experts)
        dt, D, eps = cfg.dtype, cfg.hidden_size, cfg.rms_norm_eps
        self.own_embed = names.embed is not None and names.embed in ckpt
        self.own_head = names.head is not None and names.head in ckpt
        self.embed_tokens = self._table(self.own_embed, embed_tokens, "embed_tokens", device)
        self.head = self._table(self.own_head, lm_head, "lm_head", device)
        self.enorm = RMSNorm(D, eps, kernels, dt, device)
        self.hnorm = RMSNorm(D, eps, kernels, dt, device)
        # Float unless the checkpoint ships its FP8 scale (LongCat-Flash-Chat-FP8 quantizes eh_proj; DeepSeek's FP8
        # release keeps its own float).
        scale = names.eh_proj.removesuffix("weight") + "weight_scale_inv"
        method = linear_method(cfg.quantization, names.eh_proj.removesuffix(".weight")) if scale in ckpt else FloatLinear()
        self.eh_proj = Linear(2 * D, D, method, kernels, dt, device)
        self.norm = RMSNorm(D, eps, kernels, dt, device)
        sparse = L in layer_cfg.sparse_layers
        self.moe_stats = MoEStats(1 if sparse else 0, cfg.num_experts, device)
        rope = RotaryEmbedding(cfg.attention.rope, cfg.hf_config, cfg.max_model_len, kernels, device)
        self._ckpt = ckpt
        self.layer = lone_layer(layer_cfg, L, rope, kernels, device, ep, self.moe_stats, layer_spec,
                                fused_experts=names.publish(fused_experts_name(L)) in ckpt, tp=tp)
        if self.layer.mixer_name != "self_attn":
            raise ValueError(f"{cfg.architecture}'s MTP layer must run full attention (layer {L}'s is "
                             f"{layer_cfg.attention_for(L).kind!r}).")

    def _table(self, own: bool, shared: torch.Tensor | None, what: str, device) -> torch.Tensor:
        if own:  # zeros: under TP the last shard's rows past the vocabulary stay so (engine/tp/vocab.py)
            return nn.Parameter(torch.zeros(self.vocab.rows, self.cfg.hidden_size, dtype=self.cfg.dtype,
                                            device=device), requires_grad=False)
        if shared is None:
            raise ValueError(f"the checkpoint has no MTP copy of the {what}: the module shares the main model's, "
                             f"so pass {what}=...")
        return shared

    def forward(self, positions_T: torch.Tensor, input_ids_T: torch.Tensor, hidden_TD: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """positions_T int64 [T]; input_ids_T int64 [T], the token after each conditioning state; hidden_TD [T, D],
        the conditioning states (h_t, or the previous draft's output). Writes and reads this layer's cache
        (ctx.kv_caches[layer_index]). Returns the final-normed [T, D] (what `compute_logits` and the next chained
        draft read)."""
        return run_stages(self.stages(positions_T, input_ids_T, hidden_TD, ctx))

    def stages(self, positions_T, input_ids_T, hidden_TD, ctx: ForwardContext) -> Stages:
        """`forward` as stages: yields while its MoE all-to-all is in flight (under expert parallelism)."""
        e_TD = self.vocab.embed(input_ids_T, self.embed_tokens)
        if self.names.mask_position0:
            e_TD = e_TD.masked_fill((positions_T == 0)[:, None], 0)
        e_TD = self.enorm(e_TD)
        x_TD = self.eh_proj(torch.cat([e_TD, self.hnorm(hidden_TD)], dim=-1))
        y_TD, residual_TD = yield from self.layer.stages(positions_T, (x_TD, None), None, ctx)
        out_TD, _ = self.norm.add_forward(y_TD, residual_TD)
        return out_TD

    def moe_only_stages(self) -> MoEOnlyStages:
        """A rank with no draft tokens under expert parallelism still joins this layer's dispatch and combine."""
        if self.layer.moe is not None:
            yield from self.layer.moe.stages(self.embed_tokens.new_zeros(0, self.cfg.hidden_size))

    def compute_logits(self, hidden_TD: torch.Tensor) -> torch.Tensor:
        """[T, V] logits of the token after the next, from `forward`'s (already normed) rows (in the head's dtype:
        Hy4 keeps its LM head in float32 under a half model)."""
        return self.vocab.logits(hidden_TD.to(self.head.dtype), self.head)

    def process_weights_after_loading(self) -> None:
        """The checkpoint kind's conversions, as the main model's (MLA's kv_b_proj split, zero-centred norms)."""
        CHECKPOINT.get(self._spec.checkpoint).after_load(self.cfg, self)

    def weight_plan(self, checkpoint_names: Collection[str] | None = None) -> WeightPlan:
        """Checkpoint tensor name → destination, in the family's published names (`MTPNames`); the main model's
        embedding and head are the main model's plan."""
        ckpt = frozenset(checkpoint_names) if checkpoint_names is not None else self._ckpt
        n = self.names
        plan: WeightPlan = {**self.enorm.weight_plan(n.enorm), **self.hnorm.weight_plan(n.hnorm),
                            **self.eh_proj.weight_plan(n.eh_proj), **self.norm.weight_plan(n.norm)}
        if self.own_embed and n.embed is not None:
            plan[n.embed] = self.vocab.plan_entry(self.embed_tokens)
        if self.own_head and n.head is not None:
            plan[n.head] = self.vocab.plan_entry(self.head)
        # The inner layer's plan reads its experts' layout under its planned name (Hy4 publishes them fused under
        # model.mtp_layers.0.).
        fused = fused_experts_name(self.layer_index)
        planned = ckpt | {fused} if n.publish(fused) in ckpt else ckpt
        inner = layer_weight_plan(self.layer, self.layer_index, self._layer_cfg, self._spec, self.expert_ids, planned)
        inner = {n.publish(name): entry for name, entry in inner.items()}
        plan.update(CHECKPOINT.get(self._spec.checkpoint).plan(self._layer_cfg, self._spec, inner, ckpt))
        return plan


__all__ = ["MTPNames", "NormedMTPLayer"]
