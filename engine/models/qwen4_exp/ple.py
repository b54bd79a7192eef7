"""Per-Layer Embedding (PLE, transformers' Qwen4ExpTextPLELayer): before a gated DeltaNet layer, each token's hashed
n-gram embedding (engine/models/ngram_embedding.py) is projected to one value and one key per residual stream; the
normed streams gate the value,
    gate[k] = signed sqrt(|key[k] . query[k]| / sqrt(D)),   g[k] = sigmoid(gate[k]) * value
and a dilated depthwise convolution (kernel K, dilation ngram_size, SiLU) over the normed g adds local context:
    streams += g + silu(conv(RMSNorm(g)))
Its states (PLELinearConfig, after gated DeltaNet's two in the layer's pools): the conv's last (K - 1) * dilation
rows and the n-gram table's token context; a verify step (speculative decoding) leaves them as they are and
`replay_states` advances them over the accepted tokens, as gated DeltaNet's.

Legend: T tokens, n streams, D hidden, E embed_dim, X = n * D channels, R conv state rows.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...tp.group import TensorParallel
from ..layers import ForwardContext, param
from ..ngram_embedding import NGramEmbedding, causal_rows, replay_rows
from .hyper import GroupedRMSNorm
from .reader import PLEConfig

if TYPE_CHECKING:
    from moelink.kernels.ops import Kernels


class PLE(nn.Module):
    def __init__(self, cfg: PLEConfig, hidden: int, eps: float, kernels: Kernels, dtype, device=None,
                 tp: TensorParallel | None = None):
        super().__init__()
        X, E, D = cfg.channels, cfg.ngram.embed_dim, hidden
        self.cfg, self.D, self.n = cfg, D, X // D
        self.ple_embedding = NGramEmbedding(cfg.ngram, dtype, device, tp)  # under TP: its columns (the table alone)
        self.key_proj_XE = param(X, E, dtype=dtype, device=device)
        self.value_proj_DE = param(D, E, dtype=dtype, device=device)
        self.norm_key = GroupedRMSNorm(X, D, eps, kernels, dtype, device)
        self.norm_query = GroupedRMSNorm(X, D, eps, kernels, dtype, device)
        self.norm_conv = GroupedRMSNorm(X, D, eps, kernels, dtype, device)
        self.conv_XK = param(X, cfg.conv_kernel, dtype=dtype, device=device)
        self.pending: list = []  # a verify step's states to replay after sampling (ngram_embedding.causal_rows)

    def replay_states(self, num_accepted_S: torch.Tensor) -> None:
        """After a verify step's sampling: the verifying sequences' conv rows and n-gram context take their accepted
        tokens only."""
        replay_rows(self.pending, num_accepted_S)

    def forward(self, x_TnD: torch.Tensor, ids_T: torch.Tensor, pools: tuple[torch.Tensor, ...],
                ctx: ForwardContext) -> torch.Tensor:
        """The streams with the PLE added; `pools`: (conv_state_PRX, ngram_context_PK)."""
        conv_pool_PRX, ngram_pool_PK = pools
        T, n, D = x_TnD.shape
        emb_TE = self.ple_embedding(ids_T, ngram_pool_PK, ctx, self.pending)
        key_TnD = self.norm_key(F.linear(emb_TE, self.key_proj_XE)).view(T, n, D)
        value_TD = F.linear(emb_TE, self.value_proj_DE)
        query_TnD = self.norm_query(x_TnD.reshape(T, -1)).view(T, n, D)
        gate_Tn1 = (key_TnD * query_TnD).sum(dim=-1, keepdim=True) / math.sqrt(D)
        gate_Tn1 = gate_Tn1.abs().clamp_min(1e-6).sqrt() * gate_Tn1.sign()
        g_TX = (torch.sigmoid(gate_Tn1) * value_TD[:, None, :]).reshape(T, -1)
        normed_TX = self.norm_conv(g_TX)
        window_TWX = torch.cat([causal_rows(normed_TX, conv_pool_PRX, ctx, self.pending), normed_TX[:, None, :]], dim=1)
        R, dil = self.cfg.conv_rows, self.cfg.dilation
        taps = torch.arange(self.cfg.conv_kernel, device=x_TnD.device) * dil + (R - (self.cfg.conv_kernel - 1) * dil)
        conv_TX = (window_TWX.index_select(1, taps) * self.conv_XK.t()[None]).sum(dim=1)
        return x_TnD + (g_TX + F.silu(conv_TX)).view(T, n, D)

    def weight_plan(self, p: str, names: frozenset[str] = frozenset()) -> WeightPlan:
        """`p` = "model.layers.{i}.ple."; the n-gram table in its split_ngram_parts shards."""
        e = p + "ple_embedding."
        return {**self.ple_embedding.weight_plan(e + "ngram_embedding", self.cfg.shards, e, names),
                p + "key_proj.weight": PlanEntry(self.key_proj_XE, ()),
                p + "value_proj.weight": PlanEntry(self.value_proj_DE, ()),
                **self.norm_key.weight_plan(p + "norm_key.weight"),
                **self.norm_query.weight_plan(p + "norm_query.weight"),
                **self.norm_conv.weight_plan(p + "norm_conv.weight"),
                p + "conv1d.weight": PlanEntry(self.conv_XK, (), (slice(None), 0))}


__all__ = ["PLE"]
