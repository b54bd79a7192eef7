"""The embedding table and the LM head, whole or vocab-parallel over a TP group.

Legend: T tokens, S rows whose logits are wanted, D hidden, V vocab, Vs = ceil(V / N) rows a rank holds.

Under TP rank r holds vocab rows [r Vs, (r + 1) Vs) (the last shard's rows past V are zeros), reads only them
from the checkpoint, and:
- embeds: each rank looks up the ids in its shard (others give zeros) and the group all-reduces [T, D];
- computes logits: each rank its [S, Vs] columns, all-gathered into [S, N Vs] and cut to V, so every rank of
  the group holds the same logits and samples the same token (the runner also broadcasts the group's first
  rank's tokens: engine/rank/model_runner.py), as vLLM gathers the logits before its sampler.
A tied LM head is the same shard of the same parameter.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moelink.moe.weight_plan import PlanEntry

from .group import TensorParallel


class VocabShard:
    """Which vocab rows this rank holds and how it embeds and computes logits with them (tp None: all of them)."""

    def __init__(self, vocab_size: int, tp: TensorParallel | None = None):
        self.vocab_size, self.tp = vocab_size, tp
        if tp is None:
            self.rows, self.start, self.real = vocab_size, 0, vocab_size
        else:
            self.rows = -(-vocab_size // tp.size)
            self.start = min(vocab_size, tp.rank * self.rows)
            self.real = min(vocab_size, self.start + self.rows) - self.start  # rows the checkpoint fills

    def plan_entry(self, param: torch.Tensor) -> PlanEntry:
        """The checkpoint's [V, D] table -> this rank's rows of it (read alone)."""
        if self.tp is None:
            return PlanEntry(param, ())
        return PlanEntry(param, (slice(0, self.real),), (slice(self.start, self.start + self.real),))

    def embed(self, ids_T: torch.Tensor, table_VsD: torch.Tensor) -> torch.Tensor:
        """[T, D] embeddings (summed over the group under TP: each id's row lives on one rank)."""
        if self.tp is None:
            return F.embedding(ids_T, table_VsD)
        local_T = ids_T - self.start
        mine_T = (local_T >= 0) & (local_T < self.rows)
        x_TD = F.embedding(local_T.clamp(0, self.rows - 1), table_VsD) * mine_T[:, None].to(table_VsD.dtype)
        return self.tp.all_reduce(x_TD)

    def logits(self, h_SD: torch.Tensor, head_VsD: torch.Tensor, bias_Vs: torch.Tensor | None = None) -> torch.Tensor:
        """[S, V] logits, the same on every rank of the group; `bias_Vs`: the head's bias, this rank's rows."""
        logits_SVs = F.linear(h_SD, head_VsD, bias_Vs)
        if self.tp is None:
            return logits_SVs
        return self.tp.all_gather_last(logits_SVs)[:, : self.vocab_size]


__all__ = ["VocabShard"]
