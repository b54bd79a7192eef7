"""Drafters: what proposes a rank's draft tokens for speculative decoding, one strategy per method.

After a step is collected, the runner asks its drafter for each request that sampled in it: up to k tokens the
request is likely to emit next. They go back with the step's output (`ModelRunnerOutput.draft_token_ids`), the
scheduler keeps them on the request, and the request's next decode step verifies them
(engine/rank/spec_verify.py; scheduler/spec_decode.py). Under expert parallelism each rank drafts for its own
requests.

Which requests draft: those whose next token is drawn by the processors the verify step applies at every
verified position (temperature, min-p, top-k, top-p, greedy, seeds; penalties counting the drafts before each
position; the grammar's mask at each position; logprobs of each emitted token). A request with EOS still held
back by min_tokens decodes without drafts until it has its min_tokens (exactly as without speculation).

Two kinds. A host drafter (`Drafter`) proposes at collect, from the request states: "ngram" (prompt lookup,
engine/rank/ngram_proposer.py), or a `drafter_factory` given through the Python API (tests, benchmarks: e.g. a
drafter of known acceptance), which takes precedence over the method. A device drafter (`DeviceDrafter`) drafts
inside the step's device work, after the acceptance rule, and its drafts come back with the step's tokens by the
same non-blocking copies: a ChainDrafter (engine/rank/chain_drafter.py) over one draft layer, "mtp" the
checkpoint's next-n prediction layer (engine/rank/mtp_drafter.py) or "eagle3" a head from its own checkpoint
(engine/rank/eagle3_drafter.py), built by the model runner (`make_device_drafter`) because it needs the model.
Either way the drafts reach the scheduler as `ModelRunnerOutput.draft_token_ids` (engine/rank/step_handle.py).

Tensor parallelism (as vLLM and SGLang run drafters: on every rank of the group): every rank of a TP group runs
the same steps, and the group's first rank's output is the group's (engine/cluster/ray_executor.tp_group_outputs),
so its drafts are the ones verified. A host drafter proposes on every rank from the same request states (the
verify step's emitted tokens are the first rank's on every rank: engine/rank/spec_verify.py). A device drafter is
built with the group: MTP's layer split like a main layer (engine/rank/mtp_drafter.py), an EAGLE-3 head
replicated (engine/rank/eagle3_drafter.py).
"""
from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from moelink.comm.tensor_parallel import TensorParallel

from .eagle3_drafter import Eagle3Drafter
from .mtp_drafter import MTPDrafter
from .ngram_proposer import NgramProposer


class Drafter(Protocol):
    """Proposes up to `k` draft tokens for each of `states` (CachedRequestStates that just got their tokens)."""

    def propose(self, states: Sequence, k: int) -> list[list[int]]: ...


class DeviceDrafter(Protocol):
    """Drafts in the step's device work (engine/rank/model_runner.py calls it): `plan` on the host at launch, then
    `draft` on the device after the step's sampling, returning int64 [R, k] drafts (one row per sampled row, in
    the step's order) or None, reading the main model's states (`aux`: what its forward kept for `capture()`); a
    rank whose peers run a forward while it has no tokens runs `draft_moe_only`, so expert parallelism's
    collectives pair up."""

    on_device: bool  # True: StepHandle reads the drafts from the step's DeviceResult instead of calling propose

    def plan(self, inp, states: Sequence, picked: Sequence, spec_tokens) -> object: ...

    def draft(self, plan, h_TD, input_ids_T, positions_T, attn, sampled_R, accepted, aux=None) -> object: ...

    def capture(self) -> object: ...

    def kv_bytes_per_token(self) -> int: ...

    def draft_moe_only(self) -> None: ...


class NgramDrafter:
    def __init__(self, k: int, prompt_lookup_max: int, prompt_lookup_min: int):
        self.proposer = NgramProposer(k, prompt_lookup_max, prompt_lookup_min)

    def propose(self, states: Sequence, k: int) -> list[list[int]]:
        return [self.proposer.propose(np.asarray(st.all_token_ids, dtype=np.int64), k) for st in states]


def may_draft(st) -> bool:
    """Whether the verify step applies every processor of this request at each verified position (module
    docstring): all but EOS held back by min_tokens."""
    return len(st.output_token_ids) >= st.params.min_tokens


def make_drafter(spec) -> Drafter | None:
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


def make_device_drafter(spec, cfg, model, kernels, device, ep, block_size: int, load_format: str = "auto", tp: TensorParallel | None = None):
    """The device drafter a SpeculativeConfig names, loaded for `model` (its weights, its cache layer), or None
    (speculation off, or a host drafter). `tp`: the rank's TensorParallel, or None (module docstring)."""
    if spec is None or not spec.runs_on_device:
        return None
    k = spec.num_speculative_tokens
    if spec.runs_mtp:
        return MTPDrafter(cfg, model, kernels, device, ep, k, block_size, load_format, tp)
    return Eagle3Drafter(spec.model, cfg, model, kernels, device, ep, k, block_size, load_format, tp)
