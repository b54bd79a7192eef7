"""DeepSeek-V4's next-n prediction (MTP) layer as DeepSeek publishes it (issue 45; config.json's
num_nextn_predict_layers, 1 in V4-Flash / V4-Pro).

DeepSeek's inference code (`MTPBlock`, a subclass of its `Block`) and its files: module k is `mtp.{k}.*` (not
DeepSeek-V3's `model.layers.{L + k}.*`), a whole V4 block at layer index L + k plus
    e_proj.weight, h_proj.weight [D, D]    FP8 with `.scale` in the published files (held FP8, run W8A8)
    enorm.weight, hnorm.weight, norm.weight [D]
    hc_head_fn [n, nD], hc_head_base [n], hc_head_scale [1]   its own hyper-head
    attn.* (its kv norm `attn.kv_norm.weight`, as the main layers' published files name it; sliding only:
    `compress_ratios` ends with a 0 for it: no compressor, no indexer), attn_norm, ffn_norm, hc_attn_*, hc_ffn_*,
    ffn.gate.weight / bias (top-k routed: its index is past the hash-routed layers), ffn.experts.* (FP4 as
    published), ffn.shared_experts.*
and the main model's embedding and head (no copies). Where V3's module concatenates [enorm(e) | hnorm(h)] into one
eh_proj over one residual stream, V4's keeps the n hyper-connection streams: for the main model's streams h_TnD at
position t (before its hyper-head) and the token t+1,
    x_TnD = e_proj(enorm(emb(tok_{t+1})))[:, None, :] + h_proj(hnorm(h_TnD))     (hnorm per stream)
    y_TnD = block(x_TnD)                                                          (hyper-connections inside)
    logits(tok_{t+2}) = head(norm(hc_head(y_TnD)))                                 (its own hyper-head and norm)
and y_TnD conditions the next chained draft, as h_TnD did.

Its cache, as the speculative drafter runs it (method "mtp": engine/spec/proposer/mtp.py, a ChainDrafter), is a
paged window: the layer's kv (one shared head, key and value) per token on the engine's block ids
(`ctx.kv_caches[L + k]` = (kv_BLH,), `WindowCache`), each query reading its last W positions through its block
table (`PagedWindowAttention`). A ring per sequence, as the main layers keep, would not do: the drafter writes
positions it has not verified (the catch-up over a verify step's rejected drafts, the chained drafts past the
sequence), and a paged slot is simply written again by the real token at that position, where a ring row would have
lost the position W back that a later query still reads. W x H values per query read: tiny beside the main model's.

Under tensor parallelism (`tp`, docs/tensor-parallelism.md) the block splits as a main layer does (its heads, wo_a's
groups and wo_b, its experts split or in EP on token slices: engine/models/deepseek_v4/blocks.py); its window cache
holds the one shared kv head, whole on every rank; e_proj / h_proj, the norms and the hyper-head are replicated (their inputs, the main
model's streams after its all-reduces and the broadcast tokens, are the same on every rank: no collective for two
D x D matrices); the embedding and head are the main model's vocab shards (engine/tp/vocab.py: the embedding
all-reduced, the logits all-gathered, so every rank drafts the same greedy tokens).

Legend: T tokens, n streams, D hidden, V vocab, N heads, H head_dim, W window, B blocks, L block size, S sequences.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moelink.moe.layer import ExpertParallel, MoEOnlyStages, Stages, run_stages
from moelink.moe.stats import MoEStats
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.architectures import ArchSpec
from .reader import mtp_attention
from .reader import read_dsv4_quantization
from ...config.model import ModelConfig
from ...tp.group import TensorParallel
from ...tp.vocab import VocabShard
from ..blocks.mtp import MTP_LAYOUTS, MTPLayout
from ..layers import ForwardContext
from ..linear import Linear
from ..rope import rope_inv_freq
from .attention import DSV4Attention, RopeTable
from .blocks import Norm, mtp_layer
from ..hyper_connections import HyperHead
from .weights import dsv4_linear_method, fp8_dequant_plan, published_linear_plan


@dataclass(frozen=True)
class WindowCache:
    """The drafter's cache of an MTP layer (module docstring): one [B + 1, L, H] tensor (the null block last), in the
    model dtype, also under an fp8 KV cache (a drafter layer's few values per token). The chain drafter's
    `DraftLayer.attention`."""

    head_dim: int

    def cache_shapes(self, num_blocks: int, block_size: int, cache_dtype=None) -> tuple[tuple[int, ...], ...]:
        return ((num_blocks + 1, block_size, self.head_dim),)

    def cache_dtypes(self, cache_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
        return (cache_dtype,)

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.head_dim * dtype.itemsize


class PagedWindowAttention(DSV4Attention):
    """A sliding-only V4 attention over a paged window (module docstring): its step writes each token's kv to its
    slot, then every query p attends to positions p - W < k <= p of its sequence read through its block table, with
    the sinks. Batched, from device lengths only (no host sync), for prefill, verify and decode steps alike."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.compressor is not None:
            raise ValueError(f"PagedWindowAttention is sliding only: layer {self.layer_idx} is {self.cfg.layer_kind}.")
        self.num_paged = 1  # ctx.kv_caches[layer] = (kv_BLH,): no state pools

    def _decode(self, q_TNH, kv_TH, rows, idx, ctx: ForwardContext, paged, state) -> torch.Tensor:
        return self._window(q_TNH, kv_TH, ctx, paged[0])

    def _sequences(self, q_TNH, kv_TH, rows, idx, ctx: ForwardContext, paged, state) -> torch.Tensor:
        return self._window(q_TNH, kv_TH, ctx, paged[0])

    def _window(self, q_TNH, kv_TH, ctx: ForwardContext, kv_BLH: torch.Tensor) -> torch.Tensor:
        attn, W, dev = ctx.attn, self.cfg.sliding_window, q_TNH.device
        B1, L, H = kv_BLH.shape
        slot_T = attn.slot_mapping_T.long()
        live_T = slot_T >= 0  # padding tokens write the null block's row 0 back as it is (zeros)
        null = (B1 - 1) * L
        flat_XH = kv_BLH.view(-1, H)
        flat_XH.index_copy_(0, torch.where(live_T, slot_T, null),
                            torch.where(live_T[:, None], kv_TH.to(kv_BLH.dtype), flat_XH[null]))
        # Each token's sequence and position from the device metadata (host seq_lens may be upper bounds).
        t_T = torch.arange(q_TNH.shape[0], device=dev)
        qsl_S1 = attn.query_start_loc_S1.long()
        seq_T = torch.searchsorted(qsl_S1[1:], t_T, right=True).clamp_(max=len(attn.seq_lens) - 1)
        p_T = attn.seq_lens_S.long()[seq_T] - (qsl_S1[seq_T + 1] - t_T)
        pos_TW = p_T[:, None] - torch.arange(W - 1, -1, -1, device=dev)[None, :]
        seen_TW = pos_TW >= 0
        pos_TW = pos_TW.clamp(min=0)
        blk_TW = attn.block_tables_SM.long()[seq_T[:, None], pos_TW // L]
        keys_TWH = torch.where(seen_TW[..., None], kv_BLH[blk_TW, pos_TW % L], 0).to(q_TNH.dtype)
        return self.sink_attention(q_TNH, keys_TWH, seen_TW, self.sinks_N, self.cfg.softmax_scale)


class DSV4MTPLayer(nn.Module):
    """MTP module k of a V4 checkpoint (module docstring). `embed_VD` / `head_VD`: the main model's (under TP its
    vocab shards); `tp`: the rank's TensorParallel (None: whole)."""

    # The drafter conditions it on the main model's hyper-connection streams (engine/spec/proposer/mtp.py).
    conditions_on_streams = True

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, k: int, embed_VD: torch.Tensor, head_VD: torch.Tensor,
                 kernels, device: torch.device, ep: ExpertParallel | None = None, quant=None, tp: TensorParallel | None = None):
        super().__init__()
        self.tp = tp if tp is not None and tp.size > 1 else None
        self.vocab = VocabShard(cfg.vocab_size, self.tp)
        if not 0 <= k < cfg.num_nextn_predict_layers:
            raise ValueError(f"MTP layer {k} does not exist: config.json num_nextn_predict_layers="
                             f"{cfg.num_nextn_predict_layers}.")
        D, dt, eps = cfg.hidden_size, cfg.dtype, cfg.rms_norm_eps
        self.cfg, self.spec, self.k, self.quant = cfg, spec, k, quant
        self.index = self.layer_index = cfg.num_layers + k
        self.embed_VD, self.head_VD = embed_VD, head_VD
        self.expert_ids = list(range(cfg.num_experts)) if ep is None else list(ep.local_experts)
        self.moe_stats = MoEStats(1, cfg.num_experts, device)  # its routed experts counted apart from the model's
        attention = mtp_attention(cfg.layer_attention, cfg.hf_config)
        inv_freq, factor = rope_inv_freq(attention.rope, cfg.hf_config)
        self.rope = RopeTable(inv_freq, factor, cfg.max_model_len, device)
        self.block = mtp_layer(cfg, spec, self.index, {"main": self.rope, "compress": self.rope}, kernels, device, ep,
                               self.moe_stats, quant, attention=attention, moe_index=0,
                               attention_cls=PagedWindowAttention, tp=self.tp)
        self.cache = WindowCache(attention.head_dim)
        # FP8 as published (held so, run W8A8 like the block's linears: engine/models/deepseek_v4/weights.py)
        self.e_proj = Linear(D, D, dsv4_linear_method(quant), kernels, dt, device)
        self.h_proj = Linear(D, D, dsv4_linear_method(quant), kernels, dt, device)
        self.enorm, self.hnorm, self.norm = Norm(D, eps, device), Norm(D, eps, device), Norm(D, eps, device)
        self.hc_head = HyperHead(cfg.hyper_connections, D, eps, device)

    def forward(self, positions_T: torch.Tensor, h_TnD: torch.Tensor, next_ids_T: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """The block's output streams y_TnD [T, n, D] for conditioning streams h_TnD and tokens t+1 `next_ids_T`
        at positions `positions_T` (the main model's of h)."""
        return run_stages(self.stages(positions_T, h_TnD, next_ids_T, ctx))

    def stages(self, positions_T, h_TnD, next_ids_T, ctx: ForwardContext) -> Stages:
        e_TD = self.enorm(self.vocab.embed(next_ids_T, self.embed_VD))
        x_TnD = self.e_proj(e_TD)[:, None, :] + self.h_proj(self.hnorm(h_TnD))
        return (yield from self.block.stages(positions_T, x_TnD, next_ids_T, ctx))

    def moe_only_stages(self) -> MoEOnlyStages:
        """An empty micro-batch under EP: this rank joins the block's MoE dispatch and combine."""
        x_0D = self.embed_VD.new_zeros(0, self.cfg.hidden_size)
        yield from self.block.moe.stages(x_0D, torch.zeros(0, dtype=torch.long, device=x_0D.device))

    def process_weights_after_loading(self) -> None:
        return None

    def compute_logits(self, y_TnD: torch.Tensor) -> torch.Tensor:
        """[T, V] draft logits of y's streams: the MTP's own hyper-head and norm, the main model's head."""
        return self.vocab.logits(self.norm(self.hc_head(y_TnD)), self.head_VD)

    def weight_plan(self, checkpoint_names=None) -> WeightPlan:
        """`mtp.{k}.*` as DeepSeek publishes them (module docstring); FP8 weights read with their `.scale`."""
        p = f"mtp.{self.k}."
        plan: WeightPlan = {**published_linear_plan(self.e_proj, p + "e_proj.weight"),
                            **published_linear_plan(self.h_proj, p + "h_proj.weight"),
                            p + "enorm.weight": PlanEntry(self.enorm.weight, ()),
                            p + "hnorm.weight": PlanEntry(self.hnorm.weight, ()),
                            p + "norm.weight": PlanEntry(self.norm.weight, ()),
                            p + "hc_head_fn": PlanEntry(self.hc_head.fn_nnD, ()),
                            p + "hc_head_base": PlanEntry(self.hc_head.base_n, ()),
                            p + "hc_head_scale": PlanEntry(self.hc_head.scale_1, ())}
        block = self.block.weight_plan(p, self.index, self.cfg, self.spec, self.expert_ids, frozenset())
        plan.update({n.replace(".attn.norm.weight", ".attn.kv_norm.weight"): e for n, e in block.items()})
        if self.quant is not None:
            plan = fp8_dequant_plan(plan, checkpoint_names or (), self.quant.block)
        return plan


def dsv4_mtp_checkpoint_names(names) -> list[str]:
    """The tensors of a V4 checkpoint that belong to its MTP layers (`mtp.*`): the main model leaves them unread."""
    return [n for n in names if n.startswith("mtp.")]


def _build(cfg: ModelConfig, spec: ArchSpec, i: int, kernels, device: torch.device, ep: ExpertParallel | None = None,
           checkpoint_names=None, *, embed_tokens: torch.Tensor | None = None, lm_head: torch.Tensor | None = None,
           tp: TensorParallel | None = None) -> nn.Module:
    """MTP module i; its embedding and head are always the main model's."""
    assert embed_tokens is not None and lm_head is not None
    quant = read_dsv4_quantization(cfg.architecture, cfg.hf_config, cfg.quantization)
    return DSV4MTPLayer(cfg, spec, i, embed_tokens, lm_head, kernels, device, ep, quant=quant, tp=tp)


# The main model never reads `mtp.*`, whatever config.json counts.
MTP_LAYOUTS.add("dsv4", MTPLayout(_build, lambda cfg, names: dsv4_mtp_checkpoint_names(names)))

__all__ = ["DSV4MTPLayer", "PagedWindowAttention", "WindowCache", "dsv4_mtp_checkpoint_names"]
