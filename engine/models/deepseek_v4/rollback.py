"""DeepSeek-V4's per-sequence state rolled back to a verify step's accepted drafts (speculative decoding).

A verifying sequence runs its k + 1 tokens (the last known token and k drafts) at positions p0 .. p0 + k through every
layer as any chunk does: each token's raw KV goes into the window ring at slot p % W, each token's compressor rows (and
the indexer compressor's) into their rings at p % R. Once the sampler knows that n of them stand (the last known token
plus the accepted drafts), the state must be what running only those n tokens would have left: the slots of the rejected
positions p0 + n .. p0 + k must hold again what they held before the step (the tokens W, or R, positions back, which the
next tokens' windows still read). With k + 1 <= R (engine/models/compressed_attention_config.check_ring_rollback) each slot is
written once a step, so restoring those slots from a copy taken before the step is exact; the accepted positions' slots
keep what the step wrote. The paged compressed entries need nothing: an entry a rejected draft completed is written
again, from the right rows, by the step whose token completes that window, before any query can see it (dsv4_attention's
`_compress` writes the windows a step completes before it reads the entries).

The copy is the verifying sequences' whole state (every layer's window and rings: 19.3 MB a sequence at V4-Flash's
shape, bf16 window), taken on the device before the forward; the restore is one masked gather / scatter per state
tensor, on the device (no host sync).

Legend: V verifying sequences, J positions of a verify step (at most the ring), R ring slots, P state slots.
"""
from __future__ import annotations

import torch

from ..layers import ForwardContext


class StateRollback:
    """Copies the verifying sequences' states before a verify step and restores the rejected drafts' ring slots
    after it (module docstring). `num_paged[i]`: layer i's number of paged tensors (the rest of its caches are
    state)."""

    def __init__(self, num_paged: list[int]):
        self.num_paged = num_paged
        self._saved = None

    def snapshot(self, ctx: ForwardContext, positions_T: torch.Tensor) -> None:
        """Before a verify step's forward (ctx.state.split set): the verifying sequences' slots, first positions
        and query lengths, and a copy of each of their state tensors."""
        split = getattr(ctx.state, "split", None) if ctx.state is not None else None
        if split is None:
            self._saved = None
            return
        v = split.verify
        slots_V = v.slots_S.long()
        qsl_V1 = v.query_start_loc_S1.long()
        p0_V = positions_T.index_select(0, v.rows_T.index_select(0, qsl_V1[:-1]))
        q_V = qsl_V1[1:] - qsl_V1[:-1]
        saved = []
        for i, n_paged in enumerate(self.num_paged):
            for pool_PR in ctx.kv_caches[i][n_paged:]:
                saved.append((pool_PR, pool_PR.index_select(0, slots_V)))
        self._saved = (slots_V, p0_V, q_V, int(v.rows_T.shape[0]), saved)

    def restore(self, num_accepted_V: torch.Tensor) -> None:
        """After the verify step's sampling: each verifying sequence keeps its first num_accepted_V[v] tokens'
        writes; the slots of its other positions take back the copy."""
        if self._saved is None:
            return
        slots_V, p0_V, q_V, rows, saved = self._saved
        self._saved = None
        n_V = num_accepted_V.to(device=slots_V.device, dtype=torch.long)
        V = slots_V.shape[0]
        for pool_PR, copy_VR in saved:
            R = pool_PR.shape[1]
            J = min(R, rows)  # a verify step's tokens (at most R: each slot written once)
            j_J = torch.arange(J, device=slots_V.device)
            ring_VJ = (p0_V[:, None] + j_J[None, :]) % R
            rejected_VJ = (j_J[None, :] >= n_V[:, None]) & (j_J[None, :] < q_V[:, None])
            now_VJ = pool_PR[slots_V[:, None], ring_VJ]
            before_VJ = copy_VR[torch.arange(V, device=slots_V.device)[:, None], ring_VJ]
            mask = rejected_VJ.view(V, J, *([1] * (now_VJ.dim() - 2)))
            pool_PR[slots_V[:, None], ring_VJ] = torch.where(mask, before_VJ, now_VJ)


__all__ = ["StateRollback"]
