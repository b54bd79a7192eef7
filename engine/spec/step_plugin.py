"""Speculative decoding as a step plug-in (engine/contract/step_plugin.py): the rank's drafter and its verify step.

- A device drafter (MTP, EAGLE-3) is loaded with the rank, before its KV cache: its weights count, its draft layer
  keeps a cache layer on the engine's block ids (`kv_bytes_per_token`, `allocate_cache`), a decode graph cannot keep
  the main model's states an EAGLE-3 head reads (`allows_graphs`), and the verify graphs run 1 + k tokens a row
  (`graph_query_len`). Each step it plans on the host once the sampling rows are known, drafts on the device after
  the acceptance rule, from the last accepted position; an idle EP rank runs its draft layer's collectives.
- A host drafter (n-gram, a Python-API drafter) proposes at collect, from the request states that just got their
  tokens.
- A step with drafts to verify samples through the verify step (engine/spec/verify.py) instead of the sampler.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..contract.step_plugin import (DeviceStep, ForwardExtras, RankModel, SampledRows, SamplingContext, StepBatch,
                                    StepPlugin, StepWork)
from ..contract.spec_decoding import (CapturedStates, DeviceDrafter, DraftPlan, DraftRequest, HostDrafter,
                                      VerifyStep)
from .api import SPEC_DECODING

if TYPE_CHECKING:
    from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

    from ..config.speculative import SpeculativeConfig
    from ..config.worker_config import WorkerConfig


class _Drafts(StepWork[torch.Tensor]):
    """One step's speculative work: its verify step's sampling when it verifies drafts, its device drafter's plan
    and drafts, and at collect the next step's drafts for the rows that may draft."""

    def __init__(self, plugin: SpecDecodingPlugin, no_draft: set[str]):
        self.plugin, self.no_draft = plugin, no_draft
        self.needs_inputs = plugin.device is not None
        self.picked: list[DraftRequest] = []
        self.plan: DraftPlan | None = None
        self.aux: CapturedStates | None = None

    def plan_rows(self, rows: SampledRows) -> None:
        self.picked = list(rows.picked)
        device = self.plugin.device
        if device is not None:
            self.plan = device.plan(rows.inputs, rows.states, rows.picked, rows.spec_tokens)

    def sampling(self, ctx: SamplingContext) -> VerifyStep | None:
        if not ctx.spec_tokens:
            return None
        return SPEC_DECODING.verify_step(ctx.batch, ctx.rows_S, ctx.sample_rows, ctx.qsl_S1, ctx.picked,
                                         ctx.spec_tokens, ctx.eos_token_ids, ctx.device, ctx.token_masks,
                                         ctx.num_pending)

    def before_forward(self, dev: DeviceStep) -> None:
        if self.plan is not None:  # the states an EAGLE-3 head reads, kept by the forward itself
            self.aux = self.plugin.device.capture() if self.plugin.device is not None else None

    def forward_extras(self) -> ForwardExtras:
        return {"aux": self.aux} if self.aux is not None else {}

    def after_sampling(self, dev: DeviceStep, h_TD: torch.Tensor) -> torch.Tensor | None:
        device = self.plugin.device
        if self.plan is None or device is None or dev.inputs is None:
            return None
        x = dev.inputs  # after the acceptance rule: it drafts from the last accepted position
        return device.draft(self.plan, h_TD, x.input_ids_T, x.positions_T, x.attn, dev.sampled_R, dev.emitted_R,
                            self.aux)

    def collect(self, payload: torch.Tensor | None, out: ModelRunnerOutput) -> None:
        """Drafts for the next step of each request that sampled here and may draft: a host drafter proposes now
        (the tokens are in the states); a device drafter's are in `payload` (host memory already: no sync)."""
        if not self.picked:
            return
        may_draft = SPEC_DECODING.may_draft
        if self.plugin.device is not None:
            if payload is not None:
                rows = payload.tolist()
                out.draft_token_ids = {st.req_id: rows[r] for r, st in enumerate(self.picked) if may_draft(st)}
            return
        host = self.plugin.host
        assert host is not None, "a speculative step drafts on the host or on the device"
        states = [st for st in self.picked if may_draft(st) and st.req_id not in self.no_draft]
        if states:
            proposed = host.propose(states, self.plugin.k)
            out.draft_token_ids = {st.req_id: d for st, d in zip(states, proposed) if d}


class _IdleDraft(StepWork[None]):
    """A rank with no tokens whose peers run a forward: the draft layer's collectives, as its peers run them."""

    def __init__(self, device: DeviceDrafter):
        self.device = device

    def after_step(self, dev: DeviceStep) -> None:
        if dev.run_forward:
            self.device.draft_moe_only()


class SpecDecodingPlugin(StepPlugin):
    name = "speculative"

    def __init__(self, spec: SpeculativeConfig, device: DeviceDrafter | None, host: HostDrafter | None):
        self.k = spec.num_speculative_tokens
        self.device, self.host = device, host
        # EAGLE-3, DeepSeek-V4's MTP (the hyper-connection streams): states a captured forward does not keep.
        self.allows_graphs = not (device is not None and device.aux_layers)

    @property
    def drafter(self) -> HostDrafter | DeviceDrafter | None:
        return self.device or self.host

    def kv_bytes_per_token(self) -> int:
        return self.device.kv_bytes_per_token() if self.device is not None else 0

    def allocate_cache(self, num_kv_blocks: int) -> int:
        # its draft layer's cache, on the same block ids (engine/spec/proposer/chain.py)
        return self.device.allocate(num_kv_blocks) if self.device is not None else 0

    def weights(self) -> torch.nn.Module | None:
        return self.device.layer if self.device is not None else None

    def graph_query_len(self) -> int:
        return 1 + self.k

    def regroup_blocker(self) -> str | None:
        if self.device is not None and self.device.has_experts:
            return "its MTP drafter's MoE layer (speculative method 'mtp') is not grown in place: the runner is rebuilt"
        return None

    def plan(self, batch: StepBatch) -> StepWork | None:
        return _Drafts(self, batch.so.no_draft_req_ids)

    def plan_idle(self, so: SchedulerOutput, runs: bool) -> StepWork | None:
        return _IdleDraft(self.device) if self.device is not None and runs else None


class SpecDecodingFeature:
    """On with `--speculative-config` (WorkerConfig.speculative). Under TP every rank of the group builds the drafter
    with the group (its layers split as the main ones: engine/spec/proposer/)."""

    name = SpecDecodingPlugin.name

    def make(self, rank: RankModel, config: WorkerConfig) -> StepPlugin | None:
        spec = config.speculative
        if spec is None:
            return None
        device = SPEC_DECODING.device_drafter(spec, rank.model_cfg or rank.cfg, rank.model, rank.kernels,
                                              rank.device, rank.ep, rank.block_size, rank.load_format, tp=rank.tp)
        return SpecDecodingPlugin(spec, device, None if device is not None else SPEC_DECODING.host_drafter(spec))


FEATURE = SpecDecodingFeature()
