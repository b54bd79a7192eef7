"""How a step's forward runs: one batch, or two micro-batches whose compute overlaps each other's all-to-all.

Legend: T tokens in the flat batch, S sequences, D hidden.

The model exposes its forward as stages (`MoEDecoderForCausalLM.stages`, a generator that yields while an MoE
all-to-all is in flight, twice per MoE layer under expert parallelism). A step plan drives them:

* `SingleBatch`: one generator, run straight through (each layer still runs its shared experts during its own
  dispatch).
* `TwoBatchOverlap` (`--enable-two-batch-overlap`): the step's sequences split in two micro-batches
  (`split_sequences`: contiguous, balanced by token count) and their generators advanced in turn, one stage
  each, so per MoE layer: attn(mb0) → dispatch(mb0); attn(mb1) → dispatch(mb1); wait(mb0) → experts →
  combine(mb0); wait(mb1) → experts → combine(mb1); wait(mb0) → next layer's attention (mb0) ... Each side's
  compute runs while the other's tokens travel (SGLang's two-batch overlap, DeepEP's async handles).

Why outputs are the same: a micro-batch is a set of whole sequences, and nothing in a layer mixes sequences
except the all-to-all (which routes each token by its own experts) and the matmuls (row by row); each
micro-batch writes only its own sequences' KV slots; the hidden states are concatenated back in the flat
batch's order, so sampling sees the same rows.

Why an empty micro-batch still runs: every rank must issue the same collectives in the same order. A rank with
0 or 1 sequences runs its empty micro-batch as the MoE layers' collectives alone (`moe_only_stages`, the same
yields), and a rank with no tokens at all runs two of those.
"""
from __future__ import annotations

from typing import Generator, Protocol

import numpy as np
import torch

from ..models.layers import ForwardContext


class StepModel(Protocol):
    """What a step plan needs of the model (engine/models/moe_decoder.py)."""

    def __call__(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> torch.Tensor: ...

    def stages(self, input_ids_T: torch.Tensor, positions_T: torch.Tensor, ctx: ForwardContext) -> Generator: ...

    def forward_moe_only(self) -> None: ...

    def moe_only_stages(self) -> Generator: ...


class SingleBatch:
    """The whole step as one batch."""

    name = "single"

    def forward(self, model: StepModel, input_ids_T, positions_T, ctx: ForwardContext) -> torch.Tensor:
        return model(input_ids_T, positions_T, ctx)

    def forward_moe_only(self, model: StepModel) -> None:
        model.forward_moe_only()


class TwoBatchOverlap:
    """Two micro-batches per step, each one's attention and experts running while the other's all-to-all is in
    flight (module docstring). Always two per MoE layer, empty or not, on every rank."""

    name = "two_batch_overlap"

    def forward(self, model: StepModel, input_ids_T, positions_T, ctx: ForwardContext) -> torch.Tensor:
        query_lens = ctx.attn.query_lens
        S, s = len(query_lens), split_sequences(query_lens)
        t = sum(query_lens[:s])
        parts = [(0, s, slice(0, t)), (s, S, slice(t, None))]
        ctxs = [ctx.select(s0, s1) if s1 > s0 else None for s0, s1, _ in parts]
        gens = [model.stages(input_ids_T[tok], positions_T[tok], sub) if sub is not None
                else model.moe_only_stages() for (_, _, tok), sub in zip(parts, ctxs)]
        outs = [h_TD for h_TD in run_interleaved(gens) if h_TD is not None]
        if ctx.aux is not None:  # a drafter's captured states, back in the flat batch's order
            ctx.aux.join([sub.aux for sub in ctxs if sub is not None])  # type: ignore[misc]  # select() gave each one
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def forward_moe_only(self, model: StepModel) -> None:
        run_interleaved([model.moe_only_stages(), model.moe_only_stages()])


def split_sequences(query_lens: list[int]) -> int:
    """Where to cut the step's sequences into two micro-batches: [0, s) and [s, S), contiguous and in order (so
    the flat batch is their concatenation), with token counts as equal as the sequences allow; on a tie the first
    micro-batch takes more. S = 1 gives s = 1 (the second is empty), S = 0 gives 0."""
    prefix = np.concatenate([[0], np.cumsum(np.asarray(query_lens, dtype=np.int64))])
    imbalance = np.abs(prefix[-1] - 2 * prefix)
    # The last minimum: the largest first micro-batch among the best splits.
    return int(len(imbalance) - 1 - np.argmin(imbalance[::-1]))


def run_interleaved(gens: list[Generator]) -> list:
    """Advance each generator one stage in turn until all are done; returns their results in order. Generators
    with the same yields advance in lockstep, so each rank issues its collectives in the same order."""
    results: list = [None] * len(gens)
    live = list(range(len(gens)))
    while live:
        for i in list(live):
            try:
                next(gens[i])
            except StopIteration as done:
                results[i] = done.value
                live.remove(i)
    return results


def make_step_plan(two_batch_overlap: bool, ep_size: int) -> SingleBatch | TwoBatchOverlap:
    """The plan a rank runs: two-batch overlap only where there is an all-to-all to overlap (EP > 1); at one
    rank the flag changes nothing (the engine says so once at start-up)."""
    return TwoBatchOverlap() if two_batch_overlap and ep_size > 1 else SingleBatch()


__all__ = ["SingleBatch", "StepModel", "TwoBatchOverlap", "make_step_plan", "run_interleaved", "split_sequences"]
