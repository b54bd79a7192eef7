"""DeepSeek-V4's next-n prediction (MTP) layer as DeepSeek publishes it (issue 45; config.json's
num_nextn_predict_layers, 1 in V4-Flash / V4-Pro).

DeepSeek's inference code (`MTPBlock`, a subclass of its `Block`) and its files: module k is `mtp.{k}.*` (not
DeepSeek-V3's `model.layers.{L + k}.*`), a whole V4 block at layer index L + k plus
    e_proj.weight, h_proj.weight [D, D]    FP8 with `.scale` in the published files (dequantized at load)
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

Its cache is its sliding window (a state slot per sequence, `ctx.kv_caches[L + k]`: (window_PWH,)). It is not
served as a drafter yet: speculative decoding on V4 is refused (engine/config/dsv4.SPECULATIVE_REFUSAL: the main
layers' compressor rows and entries are not rolled back on rejected drafts).

Legend: T tokens, n streams, D hidden, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelink.moe.layer import ExpertParallel, Stages, run_stages
from moelink.moe.stats import MoEStats
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ..config.architectures import ArchSpec
from ..config.dsv4 import mtp_attention
from ..config.model import ModelConfig
from .dsv4_attention import RopeTable
from .dsv4_decoder import DSV4DecoderLayer, Norm
from .dsv4_weights import fp8_dequant_plan
from .hyper_connections import HyperHead
from .layers import ForwardContext, param
from .rope import rope_inv_freq


class DSV4MTPLayer(nn.Module):
    """MTP module k of a V4 checkpoint (module docstring). `embed_VD` / `head_VD`: the main model's."""

    def __init__(self, cfg: ModelConfig, spec: ArchSpec, k: int, embed_VD: torch.Tensor, head_VD: torch.Tensor,
                 kernels, device: torch.device, ep: ExpertParallel | None = None, quant=None):
        super().__init__()
        if not 0 <= k < cfg.num_nextn_predict_layers:
            raise ValueError(f"MTP layer {k} does not exist: config.json num_nextn_predict_layers="
                             f"{cfg.num_nextn_predict_layers}.")
        D, dt, eps = cfg.hidden_size, cfg.dtype, cfg.rms_norm_eps
        self.cfg, self.spec, self.k, self.quant = cfg, spec, k, quant
        self.index = cfg.num_layers + k
        self.embed_VD, self.head_VD = embed_VD, head_VD
        self.expert_ids = list(range(cfg.num_experts)) if ep is None else list(ep.local_experts)
        self.moe_stats = MoEStats(1, cfg.num_experts, device)  # its routed experts counted apart from the model's
        attention = mtp_attention(cfg.layer_attention, cfg.hf_config)
        inv_freq, factor = rope_inv_freq(attention.rope, cfg.hf_config)
        self.rope = RopeTable(inv_freq, factor, cfg.max_model_len, device)
        self.block = DSV4DecoderLayer(cfg, self.index, {"main": self.rope, "compress": self.rope}, kernels, device, ep,
                                      self.moe_stats, quant, attention=attention, moe_index=0)
        self.e_proj_DD = param(D, D, dtype=dt, device=device)
        self.h_proj_DD = param(D, D, dtype=dt, device=device)
        self.enorm, self.hnorm, self.norm = Norm(D, eps, device), Norm(D, eps, device), Norm(D, eps, device)
        self.hc_head = HyperHead(cfg.hyper_connections, D, eps, device)

    def forward(self, positions_T: torch.Tensor, h_TnD: torch.Tensor, next_ids_T: torch.Tensor,
                ctx: ForwardContext) -> torch.Tensor:
        """The block's output streams y_TnD [T, n, D] for conditioning streams h_TnD and tokens t+1 `next_ids_T`
        at positions `positions_T` (the main model's of h)."""
        return run_stages(self.stages(positions_T, h_TnD, next_ids_T, ctx))

    def stages(self, positions_T, h_TnD, next_ids_T, ctx: ForwardContext) -> Stages:
        e_TD = self.enorm(F.embedding(next_ids_T, self.embed_VD))
        x_TnD = F.linear(e_TD, self.e_proj_DD)[:, None, :] + F.linear(self.hnorm(h_TnD), self.h_proj_DD)
        return (yield from self.block.stages(positions_T, x_TnD, next_ids_T, ctx))

    def compute_logits(self, y_TnD: torch.Tensor) -> torch.Tensor:
        """[T, V] draft logits of y's streams: the MTP's own hyper-head and norm, the main model's head."""
        return F.linear(self.norm(self.hc_head(y_TnD)), self.head_VD)

    def weight_plan(self, checkpoint_names=None) -> WeightPlan:
        """`mtp.{k}.*` as DeepSeek publishes them (module docstring); FP8 weights read with their `.scale`."""
        p = f"mtp.{self.k}."
        plan: WeightPlan = {p + "e_proj.weight": PlanEntry(self.e_proj_DD, ()),
                            p + "h_proj.weight": PlanEntry(self.h_proj_DD, ()),
                            p + "enorm.weight": PlanEntry(self.enorm.weight, ()),
                            p + "hnorm.weight": PlanEntry(self.hnorm.weight, ()),
                            p + "norm.weight": PlanEntry(self.norm.weight, ()),
                            p + "hc_head_fn": PlanEntry(self.hc_head.fn_nnD, ()),
                            p + "hc_head_base": PlanEntry(self.hc_head.base_n, ()),
                            p + "hc_head_scale": PlanEntry(self.hc_head.scale_1, ())}
        block = self.block.weight_plan(self.index, self.spec, self.expert_ids, self.cfg.num_experts, prefix=p)
        plan.update({n.replace(".attn.norm.weight", ".attn.kv_norm.weight"): e for n, e in block.items()})
        if self.quant is not None:
            plan = fp8_dequant_plan(plan, checkpoint_names or (), self.quant.block)
        return plan


def dsv4_mtp_checkpoint_names(names) -> list[str]:
    """The tensors of a V4 checkpoint that belong to its MTP layers (`mtp.*`): the main model leaves them unread."""
    return [n for n in names if n.startswith("mtp.")]


__all__ = ["DSV4MTPLayer", "dsv4_mtp_checkpoint_names"]
