"""A model step launched on a rank's device stream and not yet collected (the overlapped loop's unit).

Legend: R rows that sample this step, L rows that asked for logprobs.

`ModelRunner.launch` does the host work of a step and submits its device work; it returns a `StepHandle` at
once. The device work leaves the sampled ids on the device (`sampled_R`: the next step reads them there)
and enqueues their copy to the host. `collect()` waits for the device (the only host sync of a step), appends
the sampled tokens to the request states, and returns the step's `ModelRunnerOutput`.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from moelink.moe.stats import MoECounters
from moelink.scheduler.outputs import ModelRunnerOutput, StepStats

from ..contract.spec_decoding import VerifyResult
from ..contract.step_plugin import StepWork
from .device_stream import DeviceWork
from ..contract.logprob_rows import unpack_logprobs


@dataclass
class DeviceResult:
    """What a step's device work hands back, in host memory once its DeviceWork is waited for."""

    tokens_R: Optional[torch.Tensor] = None  # long [R], host copy of the sampled ids
    logprobs_LX: Optional[torch.Tensor] = None  # float32 [L, 3 + 2N], host copy (engine/contract/logprob_rows.py)
    num_logprobs: Optional[list] = None
    max_num_logprobs: int = 0
    read_moe: Optional[Callable[[], MoECounters]] = None  # MoEStats.take()'s reader
    device_s: float = 0.0  # seconds the device work took to run (CPU) or to launch (CUDA), host clock
    spec: Optional[VerifyResult] = None  # a verify step's sampling (engine/spec/verify.py)
    # The step plug-ins' payloads (StepWork.after_forward), one per StepHandle.works entry, in host memory.
    payloads: list = dataclasses.field(default_factory=list)


class StepHandle:
    """One launched step of one rank (see the module docstring)."""

    def __init__(self, step_id: int, states: list, num_tokens: int, num_seqs: int, host_s: float,
                 collectors: Sequence[Callable[[ModelRunnerOutput], None]] = (),
                 spec_tokens: Optional[dict[str, list[int]]] = None):
        self.step_id = step_id
        # The drafts this step verifies per request (speculative decoding: their rejected tail is rolled back at
        # collect).
        self.spec_tokens = spec_tokens
        # The plug-ins that report with every collected step (a KV connector's ended transfers), and the plug-ins'
        # work of this step (engine/contract/step_plugin.py), whose payloads come back in DeviceResult.payloads.
        self.collectors = collectors
        self.works: Sequence[StepWork] = ()
        self.states = states  # the request states of the rows that sample, in row order
        self.num_tokens, self.num_seqs = num_tokens, num_seqs
        self.host_s = host_s
        # long [R] on the device, set by the device work (stream order: a later step's device work reads it).
        self.sampled_R: Optional[torch.Tensor] = None
        self.work: Optional[DeviceWork] = None
        self._output: Optional[ModelRunnerOutput] = None

    def wait_device(self) -> None:
        """Block until the device finished this step (its results are then in host memory)."""
        if self.work is not None:
            self.work.wait()

    def collect(self) -> ModelRunnerOutput:
        """The step's output; the first call waits for the device and appends the tokens to the states."""
        if self._output is not None:
            return self._output
        t0 = time.perf_counter()
        out = ModelRunnerOutput(step_id=self.step_id)
        res: DeviceResult | None = self.work.wait() if self.work is not None else None
        wait_s = time.perf_counter() - t0
        for collect in self.collectors:
            collect(out)
        if res is None:  # the rank ran no model code
            self._output = out
            return out
        if res.spec is not None:
            self._collect_verified(res.spec, out)
        elif res.tokens_R is not None:
            token_ids = res.tokens_R.tolist()  # host memory already (the wait above): no device sync here
            logprobs = (unpack_logprobs(res.logprobs_LX.tolist(), res.num_logprobs, res.max_num_logprobs)
                        if res.logprobs_LX is not None else None)
            sampled = out.sampled_token_ids
            # One token per row (ModelRunnerOutput takes a list: a runner that emits several for a request, e.g.
            # verified draft tokens, must keep only the first while a later step of it is in flight, as the
            # scheduler does: scheduler/step_output.py).
            for r, (st, tok) in enumerate(zip(self.states, token_ids)):
                st.output_token_ids.append(tok)
                st.all_token_ids.append(tok)
                if st.pending is not None and st.pending[0] is self:
                    st.pending = None
                sampled[st.req_id] = [tok]
                if logprobs is not None and logprobs[r] is not None:
                    out.logprobs[st.req_id] = [logprobs[r]]
        moe = res.read_moe() if res.read_moe is not None else None
        out.stats = StepStats(self.num_tokens, self.num_seqs, self.host_s + res.device_s, moe, wait_s=wait_s)
        for work, payload in zip(self.works, res.payloads):  # what each plug-in adds to the output
            work.collect(payload, out)
        self._output = out
        return out

    def _collect_verified(self, spec: VerifyResult, out: ModelRunnerOutput) -> None:
        """A verify step: each row's emitted tokens (accepted drafts and one more) appended; the rejected drafts'
        positions are no longer computed (their KV slots are overwritten by the next tokens)."""
        drafts = self.spec_tokens or {}
        logprobs = None
        if spec.plain_logprobs is not None:
            packed, num, top = spec.plain_logprobs
            logprobs = dict(zip(spec.plain_rows, unpack_logprobs(packed.tolist(), num, top)))
        verify_lp = {}
        if spec.verify_logprobs is not None:
            packed, N = spec.verify_logprobs
            rows, base = packed.tolist(), 0
            for r, k in zip(spec.verify_rows, spec.num_draft):
                n = self.states[r].params.logprobs
                if n is not None:
                    verify_lp[r] = unpack_logprobs(rows[base: base + k + 1], [n] * (k + 1), N)
                base += k + 1
        for r, (st, tokens) in enumerate(zip(self.states, spec.token_lists())):
            st.output_token_ids.extend(tokens)
            st.all_token_ids.extend(tokens)
            st.num_computed_tokens -= len(drafts.get(st.req_id, ())) - (len(tokens) - 1)
            if st.pending is not None and st.pending[0] is self:
                st.pending = None
            out.sampled_token_ids[st.req_id] = tokens
            if r in verify_lp:
                out.logprobs[st.req_id] = verify_lp[r][: len(tokens)]
            elif logprobs is not None and logprobs.get(r) is not None:
                out.logprobs[st.req_id] = [logprobs[r]]


__all__ = ["DeviceResult", "StepHandle"]
