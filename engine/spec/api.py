"""Speculative decoding as the rank calls it: `SPEC_DECODING`, the package's implementation of the rank's seam
(engine/contract/spec_decoding.SpecDecoding), which the cluster hands each Worker (engine/cluster/executor.py,
ray_executor.py; picklable: Ray ships it to the rank processes).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from moelink.kernels.ops import Kernels
from moelink.moe.layer import ExpertParallel

from ..config.model import ModelConfig
from ..config.speculative import SpeculativeConfig
from ..contract.spec_decoding import (DeviceDrafter, DraftRequest, HostDrafter, SamplingBatch, SpecDecoding,
                                      VerifyStep)
from ..tp.group import TensorParallel
from .proposer import make_device_drafter, make_drafter, may_draft
from .verify import SpecStep


class SpeculativeDecoding:
    """The proposers of engine/spec/proposer/ and the verify step of engine/spec/verify.py behind the seam."""

    def host_drafter(self, spec: SpeculativeConfig | None) -> HostDrafter | None:
        return make_drafter(spec)

    def device_drafter(self, spec: SpeculativeConfig | None, cfg: ModelConfig, model: nn.Module, kernels: Kernels,
                       device: torch.device, ep: ExpertParallel | None, block_size: int, load_format: str = "auto",
                       tp: TensorParallel | None = None) -> DeviceDrafter | None:
        return make_device_drafter(spec, cfg, model, kernels, device, ep, block_size, load_format, tp)

    def verify_step(self, batch: SamplingBatch, rows_S: np.ndarray, sample_rows: list[int], qsl_S1: np.ndarray,
                    picked: Sequence[DraftRequest], spec_tokens: Mapping[str, list[int]], eos_token_ids: set[int],
                    device: torch.device, bitmasks: Mapping[str, bytes] | None,
                    num_pending: list[int]) -> VerifyStep:
        return SpecStep(batch, rows_S, sample_rows, qsl_S1, picked, spec_tokens, eos_token_ids, device, bitmasks,
                        num_pending)

    def may_draft(self, state: DraftRequest) -> bool:
        return may_draft(state)


SPEC_DECODING: SpecDecoding = SpeculativeDecoding()

__all__ = ["SPEC_DECODING", "SpeculativeDecoding"]
