"""What a step tells the layers that keep per-sequence state (linear attention, engine/models/gated_deltanet.py):
each sequence's state slot, whether it continues a state, and where its tokens sit in the flat batch.

Legend: S sequences.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch


@dataclass
class StateGroup:
    """Some of a step's sequences as a batch of their own: their token rows in the flat batch, their query starts
    within that selection, their slots, whether each continues a state, and whether every one computes one token."""

    rows_T: torch.Tensor  # int64 [T']: the group's rows of the flat batch, in order
    query_start_loc_S1: torch.Tensor  # int32 [S' + 1], within rows_T
    slots_S: torch.Tensor  # int32 [S']
    has_initial_S: torch.Tensor  # bool [S']
    pure_decode: bool


@dataclass
class VerifySplit:
    """A speculative verify step of a model with per-sequence state: the sequences that verify drafts run without
    writing their states (the decode kernels with an empty buffer) while the others (`rest`, None when none) run
    as in any step; once the sampler knows how many of each verifying sequence's tokens were accepted, the model
    replays just those over the untouched states (`MoEDecoderForCausalLM.replay_states`)."""

    verify: StateGroup
    rest: StateGroup | None


@dataclass
class StateStep:
    """Per step; device tensors for the kernels, `pure_decode` on the host (one token per sequence: the decode
    kernels, which need no has_initial_S: a decoding sequence always continues its state)."""

    slots_S: torch.Tensor  # int32 [S]: the state slot of each sequence (-1: a padding row)
    has_initial_S: torch.Tensor  # bool [S]: read the slot (False: the sequence's first chunk starts from zeros)
    query_start_loc_S1: torch.Tensor  # int32 [S + 1], as AttentionMetadata's
    pure_decode: bool
    split: VerifySplit | None = None  # a verify step (speculative decoding): see VerifySplit

    def select(self, s0: int, s1: int) -> "StateStep":
        """Sequences [s0, s1) as a batch of their own (a micro-batch), sliced on the device."""
        if self.split is not None:
            raise ValueError("StateStep.select of a verify step: two-batch overlap does not split verify steps.")
        qsl = self.query_start_loc_S1[s0: s1 + 1]
        return dataclasses.replace(self, slots_S=self.slots_S[s0:s1], has_initial_S=self.has_initial_S[s0:s1],
                                   query_start_loc_S1=qsl - qsl[:1])


__all__ = ["StateGroup", "StateStep", "VerifySplit"]
