"""Speculative decoding's seam: everything a rank's model runner calls of the feature, typed.

The feature itself is one package, engine/spec/ (its proposers, the verify step and its acceptance rule; the draft
heads in engine/spec/heads/). It sits above the rank: a proposer loads its weights with the rank's loader, the verify
step samples its plain rows with the rank's sampler. So the rank never imports it: the cluster hands each Worker the
feature as a `SpecDecoding` (engine/spec/api.SPEC_DECODING) and the runner calls it only through these protocols.
The rank's own objects appear here by what the feature reads of them (structural protocols: a CachedRequestState
is a `DraftRequest`, a StepInputs a `DraftStepInputs`), so this floor imports nothing above it.

The parts (ARCHITECTURE.md, Speculative decoding):
- proposers: a `HostDrafter` proposes at collect from the request states (n-gram, a Python-API drafter); a
  `DeviceDrafter` drafts inside the step's device work (MTP, EAGLE-3), `plan` on the host at launch, `draft` on the
  device after the step's acceptance rule;
- the verifier: a `VerifyStep` per verify step (the acceptance rule for the rows that verify drafts, the sampler for
  the others), whose `VerifyResult` the step's collect reads;
- the rollback: a model with per-sequence state (linear attention, DeepSeek-V4's rings) takes back a verify step's
  rejected drafts (`DraftRollback.replay_states`).

Legend: T tokens of the step's flat batch, D hidden, R rows that sample this step, S sequences, M blocks per
sequence, k drafts per request.
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from moelink.kernels.attention import AttentionMetadata
from moelink.kernels.ops import Kernels
from moelink.moe.layer import ExpertParallel

from ..config.model import ModelConfig
from ..config.speculative import SpeculativeConfig
from ..tp.group import TensorParallel
from .sampling_params import SamplingParams


class DraftRequest(Protocol):
    """What the feature reads of a request's state (engine/rank/input_batch.CachedRequestState)."""

    @property
    def req_id(self) -> str: ...

    @property
    def all_token_ids(self) -> list[int]: ...

    @property
    def output_token_ids(self) -> list[int]: ...

    @property
    def params(self) -> SamplingParams: ...

    @property
    def block_ids(self) -> list[int]: ...

    @property
    def num_computed_tokens(self) -> int: ...


class DraftStepInputs(Protocol):
    """What a device drafter's host half reads of a step's flat batch (engine/rank/step_inputs.StepInputs)."""

    @property
    def qsl_S1(self) -> np.ndarray: ...  # int32 [S + 1]: each sequence's query start

    @property
    def sample_rows(self) -> list[int]: ...  # the sequences that sample, in order

    @property
    def positions_T(self) -> np.ndarray: ...  # int64 [T]

    @property
    def tables_SM(self) -> np.ndarray: ...  # int32 [S, M]: the block tables


class HostDrafter(Protocol):
    """Proposes up to `k` draft tokens for each of `states` (the requests that just got their tokens), at collect."""

    def propose(self, states: Sequence[DraftRequest], k: int) -> list[list[int]]: ...


class DraftPlan(Protocol):
    """A device drafter's host half of one step (engine/spec/proposer/chain.ChainPlan), read by its device half."""

    @property
    def num_rows(self) -> int: ...  # sampled rows it drafts for


class CapturedStates(Protocol):
    """The main model's states its forward kept for a drafter (engine/models/layers.AuxCapture)."""

    def states(self) -> list[torch.Tensor]: ...


class DeviceDrafter(Protocol):
    """Drafts in the step's device work (engine/spec/proposer/chain.ChainDrafter): `plan` on the host at launch, then
    `draft` on the device after the step's sampling, returning the host copy of int64 [R, k] drafts (one row per
    sampled row, in the step's order) or None, reading the main model's states (`aux`: what its forward kept for
    `capture()`); a rank whose peers run a forward while it has no tokens runs `draft_moe_only`, so expert
    parallelism's collectives pair up. Its layer keeps a KV cache layer of its own on the engine's block ids."""

    on_device: bool  # True: the step's collect reads the drafts from its device result instead of proposing

    @property
    def layer(self) -> nn.Module: ...  # its weights (memory accounting)

    @property
    def aux_layers(self) -> tuple[int, ...]: ...  # main-model layer counts whose states it reads (empty: none)

    @property
    def has_experts(self) -> bool: ...  # routed experts: under EP it joins its peers' collectives every step

    def kv_bytes_per_token(self) -> int: ...

    def allocate(self, num_kv_blocks: int) -> int: ...  # its cache on the engine's block ids; returns its bytes

    def capture(self) -> CapturedStates | None: ...  # what the main forward must keep for it, or None

    def plan(self, inp: DraftStepInputs, states: Sequence[DraftRequest], picked: Sequence[DraftRequest],
             spec_tokens: Mapping[str, list[int]] | None) -> DraftPlan: ...

    def draft(self, plan: DraftPlan, h_TD: torch.Tensor, input_ids_T: torch.Tensor, positions_T: torch.Tensor,
              attn: AttentionMetadata, sampled_R: torch.Tensor | None, accepted: torch.Tensor | None,
              aux: CapturedStates | None = None) -> torch.Tensor | None: ...

    def draft_moe_only(self) -> None: ...


class VerifyResult(Protocol):
    """What a verify step's sampling leaves (engine/spec/verify.SpecResult), in host memory once the step's device
    work is waited for; `sampled_R` and `emitted_R` stay on the device."""

    num_rows: int
    verify_rows: list[int]  # rows that verified drafts
    plain_rows: list[int]  # rows sampled as in any step
    num_draft: list[int]  # per verifying row
    # (packed [B, 3 + 2N] per verified position, N), or None: no verifying row asked for logprobs.
    verify_logprobs: tuple[torch.Tensor, int] | None
    # (packed [L, X], num_logprobs, max) of the plain rows (engine/contract/logprob_rows.unpack_logprobs), or None.
    plain_logprobs: tuple[torch.Tensor, list[int], int] | None
    sampled_R: torch.Tensor | None  # long [R]: each row's last emitted token
    emitted_R: torch.Tensor | None  # long [R_verify]: tokens each verifying row emits (accepted drafts + 1)

    def token_lists(self) -> list[list[int]]: ...  # per sampling row, the tokens it emits


class LogitsModel(Protocol):
    """The main model as a verify step reads it."""

    def compute_logits(self, h_TD: torch.Tensor) -> torch.Tensor: ...


class VerifyStep(Protocol):
    """One verify step's sampling, planned on the host at launch; `run` is its device half (after the forward)."""

    def run(self, model: LogitsModel, h_TD: torch.Tensor, tp: TensorParallel | None = None) -> VerifyResult: ...


class SamplingBatch(Protocol):
    """The runner's persistent batch (engine/rank/input_batch.PersistentBatch) as a verify step's sampling reads it:
    per-row sampling parameters and penalty counts."""

    @property
    def V(self) -> int: ...


class DraftRollback(Protocol):
    """A model whose per-sequence states a verify step advanced through every draft: it keeps only each verifying
    sequence's first `num_accepted_S` tokens (the last known one and the accepted drafts), on the device."""

    def replay_states(self, num_accepted_S: torch.Tensor) -> None: ...


class SpecDecoding(Protocol):
    """Speculative decoding as a rank sees it: its proposers, its verify step, and which requests draft."""

    def host_drafter(self, spec: SpeculativeConfig | None) -> HostDrafter | None:
        """The host drafter `spec` names; None when speculation is off or its method drafts on the device."""

    def device_drafter(self, spec: SpeculativeConfig | None, cfg: ModelConfig, model: nn.Module, kernels: Kernels,
                       device: torch.device, ep: ExpertParallel | None, block_size: int, load_format: str = "auto",
                       tp: TensorParallel | None = None) -> DeviceDrafter | None:
        """The device drafter `spec` names, loaded for the main `model` (its weights, its cache layer), or None."""

    def verify_step(self, batch: SamplingBatch, rows_S: np.ndarray, sample_rows: list[int], qsl_S1: np.ndarray,
                    picked: Sequence[DraftRequest], spec_tokens: Mapping[str, list[int]], eos_token_ids: set[int],
                    device: torch.device, bitmasks: Mapping[str, bytes] | None,
                    num_pending: list[int]) -> VerifyStep:
        """A verify step's sampling for the sampled rows `picked` (rows `rows_S[sample_rows]` of `batch`, their last
        tokens at `qsl_S1[1:][sample_rows] - 1`), `spec_tokens` the drafts each verifies."""

    def may_draft(self, state: DraftRequest) -> bool:
        """Whether the verify step applies every processor of this request at each verified position."""


__all__ = ["CapturedStates", "DeviceDrafter", "DraftPlan", "DraftRequest", "DraftRollback", "DraftStepInputs",
           "HostDrafter", "LogitsModel", "SamplingBatch", "SpecDecoding", "VerifyResult", "VerifyStep"]
