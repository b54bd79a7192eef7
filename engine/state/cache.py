"""A rank's per-sequence state pools: the conv and recurrent states of every linear-attention layer
(engine/models/gated_deltanet_config.py), indexed by the slots the scheduler hands out (scheduler/hybrid_cache.py).

Slots [0, num_slots) belong to running requests, [num_slots, num_slots + num_checkpoints) hold prefix-cache
checkpoints, the last one is the null slot (padded rows of a captured graph read and write it). A step's copies
run in a fixed order on the device stream, which is what makes the scheduler's reuse of slots safe: copies into
sequence slots (a prefix hit resumes from a checkpoint) before the forward, copies into checkpoint slots (saves)
after it.

Legend: P slots (the null slot included), C conv channels, W' conv kernel - 1, N value heads, K q/k head dim,
V value head dim.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from ..contract.host_copy import to_device
from .step import StateGroup, StateStep, VerifySplit


class StateConfig(Protocol):
    """A layer config whose kind keeps per-sequence state (linear attention's LinearAttentionConfig, DeepSeek-V4's
    attention config): its tensors' shapes for P slots; a kind may give their dtypes too (`state_dtypes(dtype)`)."""

    def state_shapes(self, num_slots: int) -> tuple[tuple[int, ...], ...]: ...


class StateCaches:
    """Per layer (conv_state_PCW', ssm_state_PNKV) for a linear-attention layer, None for any other."""

    def __init__(self, layers: list[StateConfig | None], num_slots: int,
                 num_checkpoints: int, dtype: torch.dtype, device: torch.device) -> None:
        self.num_slots, self.num_checkpoints = num_slots, num_checkpoints
        self.null_slot = num_slots + num_checkpoints
        self.device = device
        self.layers: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for cfg in layers:
            if cfg is None:
                self.layers.append(None)
                continue
            shapes = cfg.state_shapes(self.null_slot)
            # Linear attention: conv state in the model dtype, recurrent state in float32; a kind may say (DeepSeek-V4).
            state_dtypes = getattr(cfg, "state_dtypes", None)
            dtypes = state_dtypes(dtype) if state_dtypes is not None else (dtype, torch.float32)
            self.layers.append(tuple(torch.zeros(s, dtype=d, device=device) for s, d in zip(shapes, dtypes)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.layers if pair is not None for t in pair)

    def copy(self, dst_slots: list[int], src_slots: list[int]) -> None:
        """state[dst] = state[src] in every linear layer (one gather and one scatter per tensor)."""
        if not dst_slots:
            return
        dst = torch.tensor(dst_slots, dtype=torch.long).to(self.device, non_blocking=True)
        src = torch.tensor(src_slots, dtype=torch.long).to(self.device, non_blocking=True)
        for pair in self.layers:
            if pair is None:
                continue
            for t in pair:
                t.index_copy_(0, dst, t.index_select(0, src))


    def zero(self, slots: list[int]) -> None:
        """state[slot] = 0 in every linear layer: a sequence starting from nothing (see StatePlan.fresh_decodes)."""
        if not slots:
            return
        idx = torch.tensor(slots, dtype=torch.long).to(self.device, non_blocking=True)
        for pair in self.layers:
            if pair is None:
                continue
            for t in pair:
                t.index_fill_(0, idx, 0)


class StatePlan:
    """One step's per-sequence-state work, built on the host at launch (batch order): each sequence's slot and
    whether it continues a state, the copies the step owes (prefix hits before the forward, checkpoint saves after
    it) and, in a verify step, which sequences verify drafts (engine/state/step.VerifySplit)."""

    def __init__(self, slots: list[int], continues: list[bool], query_lens: list[int], copies_in: list[tuple[int, int]],
                 saves: list[tuple[int, int]], verifying: list[bool] | None):
        self.slots, self.continues, self.query_lens = slots, continues, query_lens
        self.copies_in, self.saves = copies_in, saves
        self.verifying = verifying if verifying and any(verifying) else None

    @property
    def fresh_decodes(self) -> list[int]:
        """The slots of sequences whose first chunk is one token (a one-token prompt, or a prompt whose prefix hit
        ends one token short). A step of one token per sequence runs the decode kernels, which always read the
        slot (they take no has_initial flag), so these slots are zeroed first: a state starting from nothing, as the
        varlen kernels start a first chunk. Without it the slot's last owner's state leaked into the new sequence."""
        return [s for s, c, q in zip(self.slots, self.continues, self.query_lens) if not c and q == 1]

    def state_step(self, qsl_S1: torch.Tensor, pure_decode: bool, device: torch.device) -> StateStep:
        """The forward's StateStep on `device` (non-blocking copies of host lists: no sync)."""
        step = StateStep(to_device(self.slots, torch.int32, device), to_device(self.continues, torch.bool, device),
                         qsl_S1, pure_decode)
        if self.verifying is not None:
            verify = [s for s, v in enumerate(self.verifying) if v]
            rest = [s for s, v in enumerate(self.verifying) if not v]
            step.split = VerifySplit(self._group(verify, device), self._group(rest, device) if rest else None)
        return step

    def _group(self, seqs: list[int], device: torch.device) -> StateGroup:
        starts = np.concatenate([[0], np.cumsum(self.query_lens)])
        rows = np.concatenate([np.arange(starts[s], starts[s + 1]) for s in seqs])
        lens = [self.query_lens[s] for s in seqs]
        return StateGroup(to_device(rows, torch.long, device), to_device(np.concatenate([[0], np.cumsum(lens)]),
                                                                         torch.int32, device),
                          to_device([self.slots[s] for s in seqs], torch.int32, device),
                          to_device([self.continues[s] for s in seqs], torch.bool, device), max(lens) == 1)


__all__ = ["StateCaches", "StatePlan"]
