"""DeepSeek-V4.1's per-sequence state after a verify step (speculative decoding): the state must be what running only
the accepted tokens would have left, whatever the number of drafts.

A verifying sequence runs its q tokens (the last known token and q - 1 drafts) at positions p0 .. p0 + q - 1 through
every layer as any chunk does (attention.py): each token's window KV goes into the window ring at slot p % W, a KV
source's compressor rows (kv and gate) into its ring at p % m. Once the sampler knows that n of them stand, each ring
slot r must hold the row of the newest position t <= p0 + n - 1 with t = r (mod ring): this step's row of t where
t >= p0 (kept aside by the layer: `V41Attention.record_steps`, T-aligned), else what the slot held before the step (a
copy of the verifying sequences' rings taken before the forward). Each slot is rewritten from those two, so a step of
more tokens than a ring has slots (a rejected draft overwriting an accepted one's slot) rolls back exactly too: no
bound on num_speculative_tokens. A slot whose newest position is older than what the layer still reads holds a row
nothing reads, as it would without speculation.

The paged compressed entries and index keys need nothing: an entry a rejected draft completed is written again, from
the right rows, by the step whose token completes that group, before any query can see it (`_compress` writes the
groups a step completes before `_entries` reads them). The picks are the step's own (`scratch`). The Engram
look-back is the residual kind's state (blocks.LaggedHyperLayer.state_hook: engine/models/ngram_embedding's
`causal_rows` / `replay_rows`).

All on the device, no host sync: a masked gather and one index_copy per ring.

Legend: V verifying sequences, R ring slots, C a ring row's width, T the step's tokens.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..layers import ForwardContext


class RingRollback:
    """The attention kind's StateHook (engine/models/blocks/attention.py) over the model's V4.1 attention layers
    (module docstring)."""

    def __init__(self, mixers: Sequence):
        self.mixers = list(mixers)
        self._saved: tuple | None = None

    def before(self, ctx: ForwardContext, positions_T: torch.Tensor) -> None:
        split = ctx.state.split if ctx.state is not None else None
        self._saved = None
        if split is None:
            for m in self.mixers:
                m.record_steps(None)
            return
        v = split.verify
        slots_V = v.slots_S.long()
        qsl_V1 = v.query_start_loc_S1.long()
        p0_V = positions_T.index_select(0, v.rows_T.index_select(0, qsl_V1[:-1]))
        copies = []
        for m in self.mixers:
            rings = m.rings(ctx)
            copies.append((rings, [ring.index_select(0, slots_V) for ring in rings]))
            m.record_steps({})
        self._saved = (slots_V, qsl_V1, v.rows_T, p0_V, copies)

    def replay(self, num_accepted_V: torch.Tensor) -> None:
        if self._saved is None:
            return
        slots_V, qsl_V1, rows_T, p0_V, copies = self._saved
        self._saved = None
        q_V = qsl_V1[1:] - qsl_V1[:-1]
        n_V = torch.minimum(num_accepted_V.to(device=slots_V.device, dtype=torch.long), q_V)
        for m, (rings, copy) in zip(self.mixers, copies):
            steps = m.record_steps(None)
            for ring_PRC, copy_VRC, step_TC in zip(rings, copy, m.step_rows(steps), strict=True):
                rewrite_ring(ring_PRC, copy_VRC, step_TC, slots_V, qsl_V1, rows_T, p0_V, n_V)


def rewrite_ring(ring_PRC: torch.Tensor, copy_VRC: torch.Tensor, step_TC: torch.Tensor, slots_V: torch.Tensor,
             qsl_V1: torch.Tensor, rows_T: torch.Tensor, p0_V: torch.Tensor, n_V: torch.Tensor) -> None:
    """Every slot of each verifying sequence's ring from its newest accepted position (module docstring)."""
    R, dev = ring_PRC.shape[1], ring_PRC.device
    last_V = p0_V + n_V - 1  # the newest accepted position (n >= 1: the last known token always stands)
    r_R = torch.arange(R, device=dev)
    t_VR = last_V[:, None] - torch.remainder(last_V[:, None] - r_R[None, :], R)
    j_VR = t_VR - p0_V[:, None]  # its index in the step; < 0: before the step
    from_step = j_VR >= 0
    flat = rows_T.index_select(0, (qsl_V1[:-1, None] + j_VR.clamp(min=0)).reshape(-1))
    step_VRC = step_TC.index_select(0, flat).view(*t_VR.shape, *step_TC.shape[1:]).to(ring_PRC.dtype)
    mask = from_step.view(*from_step.shape, *([1] * (step_VRC.dim() - 2)))
    ring_PRC.index_copy_(0, slots_V, torch.where(mask, step_VRC, copy_VRC))


__all__ = ["RingRollback", "rewrite_ring"]
