"""Proposers: what proposes a rank's draft tokens for speculative decoding, one strategy per method.

After a step is collected, the runner asks its drafter for each request that sampled in it: up to k tokens the
request is likely to emit next. They go back with the step's output (`ModelRunnerOutput.draft_token_ids`), the
scheduler keeps them on the request, and the request's next decode step verifies them
(engine/spec/verify.py; scheduler/spec_decode.py). Under expert parallelism each rank drafts for its own
requests.

Which requests draft: those whose next token is drawn by the processors the verify step applies at every
verified position (temperature, min-p, top-k, top-p, greedy, seeds; penalties counting the drafts before each
position; the grammar's mask at each position; logprobs of each emitted token). A request with EOS still held
back by min_tokens decodes without drafts until it has its min_tokens (exactly as without speculation).

Two kinds (engine/contract/spec_decoding.py). A host drafter (`HostDrafter`) proposes at collect, from the request
states: "ngram" (prompt lookup, engine/spec/proposer/ngram.py), or a `drafter_factory` given through the Python API
(tests, benchmarks: e.g. a drafter of known acceptance), which takes precedence over the method. A device drafter
(`DeviceDrafter`) drafts inside the step's device work, after the acceptance rule, and its drafts come back with the
step's tokens by the same non-blocking copies: a ChainDrafter (engine/spec/proposer/chain.py) over one draft layer,
"mtp" the checkpoint's next-n prediction layer (engine/spec/proposer/mtp.py) or "eagle3" a head from its own
checkpoint (engine/spec/proposer/eagle3.py); or "dspark", block drafting with a Markov head
(engine/spec/proposer/dspark.py: its own drafter, not a chain); each built for the model runner
(`make_device_drafter`, through
engine/spec/api.SPEC_DECODING) because it needs the model.
Either way the drafts reach the scheduler as `ModelRunnerOutput.draft_token_ids` (engine/rank/step_handle.py).

Tensor parallelism (as vLLM and SGLang run drafters: on every rank of the group): every rank of a TP group runs
the same steps, and the group's first rank's output is the group's (engine/cluster/ray_executor.tp_group_outputs),
so its drafts are the ones verified. A host drafter proposes on every rank from the same request states (the
verify step's emitted tokens are the first rank's on every rank: engine/spec/verify.py). A device drafter is
built with the group: MTP's layer split like a main layer (engine/spec/proposer/mtp.py), an EAGLE-3 head
replicated (engine/spec/proposer/eagle3.py).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from moelink.kernels.ops import Kernels
from moelink.moe.layer import ExpertParallel

from ...config.model import ModelConfig
from ...config.speculative import SpeculativeConfig
from ...contract.spec_decoding import DeviceDrafter, DraftRequest, HostDrafter
from ...tp.group import TensorParallel

from .dspark import DSparkProposer
from .eagle3 import Eagle3Drafter
from .mtp import MTPDrafter
from .ngram import NgramProposer


class NgramDrafter:
    def __init__(self, k: int, prompt_lookup_max: int, prompt_lookup_min: int):
        self.proposer = NgramProposer(k, prompt_lookup_max, prompt_lookup_min)

    def propose(self, states: Sequence[DraftRequest], k: int) -> list[list[int]]:
        return [self.proposer.propose(np.asarray(st.all_token_ids, dtype=np.int64), k) for st in states]


def may_draft(st: DraftRequest) -> bool:
    """Whether the verify step applies every processor of this request at each verified position (module
    docstring): all but EOS held back by min_tokens."""
    return len(st.output_token_ids) >= st.params.min_tokens


def make_drafter(spec: SpeculativeConfig | None) -> HostDrafter | None:
    """The host drafter a SpeculativeConfig names (engine/config/speculative.py); None when speculation is off or
    the method drafts on the device (mtp, eagle3: `make_device_drafter`)."""
    if spec is None or spec.runs_on_device:
        return None
    if spec.drafter_factory is not None:
        return spec.drafter_factory()
    if spec.method == "ngram":
        return NgramDrafter(spec.num_speculative_tokens, spec.prompt_lookup_max, spec.prompt_lookup_min)
    raise ValueError(f"speculative_config.method={spec.method!r} has no host drafter: use 'ngram', or give a "
                     "drafter_factory.")


def make_device_drafter(spec: SpeculativeConfig | None, cfg: ModelConfig, model: nn.Module, kernels: Kernels,
                        device: torch.device, ep: ExpertParallel | None, block_size: int, load_format: str = "auto",
                        tp: TensorParallel | None = None) -> DeviceDrafter | None:
    """The device drafter a SpeculativeConfig names, loaded for `model` (its weights, its cache layer), or None
    (speculation off, or a host drafter). `tp`: the rank's TensorParallel, or None (module docstring)."""
    if spec is None or not spec.runs_on_device:
        return None
    k = spec.num_speculative_tokens
    if spec.runs_mtp:
        return MTPDrafter(cfg, model, kernels, device, ep, k, block_size, load_format, tp)
    if spec.runs_dspark:
        return DSparkProposer(spec.model, cfg, model, kernels, device, ep, k, block_size, load_format, tp)
    return Eagle3Drafter(spec.model, cfg, model, kernels, device, ep, k, block_size, load_format, tp)
