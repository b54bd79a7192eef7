"""DSpark draft stages as a seam any family can fill (engine/config/dspark.py says what DSpark computes).

The drafter (engine/spec/proposer/dspark.py) owns what every DSpark draft does alike: it captures the target's
states at the tap layers (the mean over hyper-connection streams where the target keeps several), keeps each
stage's context rows in a paged cache on the engine's block ids, gathers each request's context before its
anchor, builds the block [anchor, mask, ...] and runs the Markov head's left-to-right drafting. What a family
publishes differently is the stages themselves: DFlash-format checkpoints hold Qwen3 decoder layers (built by
engine/spec/heads/dspark.py), DeepSeek-V4 / V4.1 bundle blocks of their own (hyper-connections, their attention
with a sliding window and sinks, their MoE) under `mtp.{i}.*`. Such a family registers a builder here, by the
architecture name of its config.json, from its own package (its kinds.py), as it registers its block kinds.

Legend: T tokens of the step, R requests drafting, B block slots, C context entries gathered per request,
V vocabulary, X a stage's context row (its shape is the stage's: GQA's [2, K, H], an MQA latent's [H]).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Collection, Protocol

import torch
from torch import nn
import torch.nn.functional as F

from moelink.kernels.attention import AttentionMetadata
from moelink.moe.layer import ExpertParallel, run_stages
from moelink.moe.weight_plan import PlanEntry, WeightPlan

from ...config.dspark import DSparkConfig
from ...config.model import ModelConfig
from ...tp.group import TensorParallel
from ..layers import ForwardContext, param
from .registry import Registry
from .stream import StreamState


class DSparkStages(Protocol):
    """A family's DSpark stages with their context projection, final head and Markov head, as the drafter runs
    them (module docstring)."""

    module: nn.Module  # every weight it holds (memory accounting)
    window: int | None  # context positions before the anchor a block query sees (None: all of them)
    has_experts: bool  # routed experts: under expert parallelism an idle rank must run `run_idle`

    def row_shapes(self) -> list[tuple[int, ...]]:
        """Per stage, the shape of one context token's cache row (X)."""

    def context_rows(self, taps_TD: list[torch.Tensor], positions_T: torch.Tensor) -> list[torch.Tensor]:
        """Per stage [T, *X]: the rows the step's tokens leave in that stage's cache, from the target's states at
        the tap layers (each [T, D], in target_layer_ids order) at `positions_T`."""

    def base_logits(self, ids_RB: torch.Tensor, positions_RB: torch.Tensor, ctx_RCX: list[torch.Tensor],
                    valid_RC: torch.Tensor) -> torch.Tensor:
        """float [R, B, V]: every slot's logits before the Markov head; `ctx_RCX` per stage, `valid_RC` which
        gathered entries exist (the rest are padding, masked out)."""

    def markov_bias(self, prev_R: torch.Tensor) -> torch.Tensor:
        """float [R, V]: the Markov head's bias for the slot after token `prev_R`."""

    def weight_plan(self) -> WeightPlan: ...

    def run_idle(self) -> None:
        """The stages' collectives alone (an expert-parallel rank with no rows); asked only when `has_experts`."""


class MarkovHead(nn.Module):
    """DSpark's "vanilla" Markov head, every form's: bias(prev) = W2 W1[prev], a rank-Rk bigram correction of the
    base logits (SGLang's markov_w1 [V, Rk] embedding and markov_w2 [V, Rk] projection; DeepSeek's own inference
    code calls them markov_head.embed and markov_head.head)."""

    def __init__(self, vocab_size: int, rank: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.w1_VR = param(vocab_size, rank, dtype=dtype, device=device)
        self.w2_VR = param(vocab_size, rank, dtype=dtype, device=device)

    def forward(self, prev_R: torch.Tensor) -> torch.Tensor:
        return F.linear(F.embedding(prev_R, self.w1_VR), self.w2_VR).float()

    def weight_plan(self, prefix: str, names: Collection[str] = ()) -> WeightPlan:
        """`{prefix}markov_w1.weight` / `markov_w2.weight`, or DeepSeek's `embed.weight` / `head.weight` where the
        checkpoint's `names` hold those."""
        w1, w2 = ("embed", "head") if prefix + "embed.weight" in names else ("markov_w1", "markov_w2")
        return {f"{prefix}{w1}.weight": PlanEntry(self.w1_VR, ()), f"{prefix}{w2}.weight": PlanEntry(self.w2_VR, ())}


class BundledStages(nn.Module, abc.ABC):
    """What a family's bundled stages (`mtp.{i}.*` blocks of its own) share as DSparkStages: `blocks` (each with
    `mixer.context_row(x_TD, positions_T)` and its MoE as `moe`), one shared KV head of `head_dim` per stage, the
    drafter's whole embedding and head (`tables`) and a Markov head (`markov`). A subclass builds them and says how
    the target's taps are projected (`project_taps`), what stream the block enters with (`streams`), how the last
    stage's stream is read (`finish`) and its checkpoint names (`weight_plan`)."""

    has_experts = True  # its MoE dispatches like a main layer's
    blocks: nn.ModuleList
    head_dim: int

    def __init__(self, cfg: ModelConfig, dspark: DSparkConfig, device: torch.device, embed_VD: torch.Tensor,
                 head_VD: torch.Tensor, names: Collection[str]):
        super().__init__()
        self.cfg, self.dspark, self.names = cfg, dspark, frozenset(names)
        self.hidden_size, self.dtype = cfg.hidden_size, cfg.dtype
        self.markov = MarkovHead(cfg.vocab_size, dspark.markov_rank, cfg.dtype, device)
        self.tables = (embed_VD, head_VD)  # the drafter's whole tables (a tuple: not this module's parameters)

    @property
    def module(self) -> nn.Module:
        return self

    def row_shapes(self) -> list[tuple[int, ...]]:
        return [(self.head_dim,)] * len(self.blocks)

    def context_rows(self, taps_TD: list[torch.Tensor], positions_T: torch.Tensor) -> list[torch.Tensor]:
        x_TD = self.project_taps(torch.cat(taps_TD, dim=-1).to(self.dtype))
        return [b.mixer.context_row(x_TD, positions_T) for b in self.blocks]

    def base_logits(self, ids_RB: torch.Tensor, positions_RB: torch.Tensor, ctx_RCX: list[torch.Tensor],
                    valid_RC: torch.Tensor) -> torch.Tensor:
        embed_VD, head_VD = self.tables
        R, B = ids_RB.shape
        ids_T, pos_T = ids_RB.reshape(-1), positions_RB.reshape(-1)
        state = self.streams(F.embedding(ids_T, embed_VD).to(self.dtype))
        caches: list = [()] * self.cfg.num_layers + [(c, valid_RC) for c in ctx_RCX]
        ctx = ForwardContext(block_meta(R, B, ids_T.device), caches)
        for b in self.blocks:
            state = run_stages(b.stages(pos_T, state, ids_T, ctx))
        return F.linear(self.finish(state).to(head_VD.dtype), head_VD).float().view(R, B, -1)

    @abc.abstractmethod
    def project_taps(self, taps_TX: torch.Tensor) -> torch.Tensor:
        """[T, D]: the target's tap states, concatenated, projected and normed (main_norm(main_proj(.)))."""
        ...

    @abc.abstractmethod
    def streams(self, x_TD: torch.Tensor) -> StreamState:
        """The block's residual stream entering the first stage, from its tokens' embeddings."""
        ...

    @abc.abstractmethod
    def finish(self, state: StreamState) -> torch.Tensor:
        """[T, D]: the last stage's stream collapsed and normed, what the head reads."""
        ...

    def markov_bias(self, prev_R: torch.Tensor) -> torch.Tensor:
        return self.markov(prev_R)

    def run_idle(self) -> None:
        x_0D = self.tables[0].new_zeros(0, self.hidden_size, dtype=self.dtype)
        for b in self.blocks:
            run_stages(b.moe.stages(x_0D, torch.zeros(0, dtype=torch.long, device=x_0D.device)))


def block_meta(R: int, B: int, device: torch.device) -> AttentionMetadata:
    """Metadata of R rows of B queries: a stage's attention reads its keys from the context it is handed, so only the
    shape of the batch matters (the block tables and slots are never read)."""
    qsl = torch.arange(0, (R + 1) * B, B, dtype=torch.int32, device=device)
    return AttentionMetadata(qsl, torch.full((R,), B, dtype=torch.int32, device=device),
                             torch.zeros(R, 1, dtype=torch.int32, device=device),
                             torch.zeros(R * B, dtype=torch.long, device=device), [B] * R, [B] * R, B, B, 0)


# builder(cfg, dspark, kernels, device, embed_tokens [V, D], lm_head [V, D], checkpoint names, ep, tp)
# -> DSparkStages; the tables whole on every rank (the drafter gathered them under TP).
DSparkBuilder = Callable[[ModelConfig, DSparkConfig, Any, torch.device, torch.Tensor, torch.Tensor, Collection[str],
                          ExpertParallel | None, TensorParallel | None], DSparkStages]

# Families whose config.json bundles DSpark stages register their builder under their architecture name.
DSPARK_STAGES: Registry[DSparkBuilder] = Registry("dspark stages")

__all__ = ["BundledStages", "DSPARK_STAGES", "DSparkBuilder", "DSparkStages", "MarkovHead", "block_meta"]
