"""Taking a step's output into the scheduler: append each sampled token, check the stop rules on each, cache the
blocks the step filled, free the requests that finished.

A `ModelRunnerOutput` carries a list of tokens per request that sampled (scheduler/outputs.py): one per step
today, several once a step verifies draft tokens (speculative decoding). Each token is appended in order and
checked (EOS unless ignored, a stop id, both only once `min_tokens` are out; max_tokens; max_model_len; the pool);
the first that ends the request ends it, and the tokens after it are dropped (the worker drops the request's
state with the next step's `finished_req_ids`, its blocks are freed now). The list holding one token is the hot
path (once per decoding request per step): it allocates nothing beyond the `EngineCoreOutput`, whose
`new_token_ids` is the runner's list itself.

In-flight placeholders (the overlapped loop): each step that samples for a request adds one
`Request.num_output_placeholders` when it is scheduled and takes it back when its output is taken, whatever the
number of tokens it returns, so a placeholder means "at least one token". A later step of the same request
already in flight was scheduled after that first token and sampled its successor, so only the first token of a
longer list is kept then; the worker trims by the same rule (a later step of the request was launched) and both
sides keep the same tokens. A request preempted with its token in flight takes the tokens when they come back.

`StepOutputMixin` is one half of `scheduler.Scheduler` (the other plans steps); it uses the scheduler's fields.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .engine_output import EngineCoreOutput
from .outputs import ModelRunnerOutput, SchedulerOutput
from .request import Request, RequestStatus

if TYPE_CHECKING:
    from .config import SchedulerConfig
    from .draft_control import DraftControl
    from .hybrid_cache import HybridCacheManager
    from .kv_cache_manager import KVCacheManager
    from .kv_connector import KVTransfers
    from .spec_decode import SpecDecodeCounters


class StepOutputMixin:
    """`update_from_output` and the stop rules of `scheduler.Scheduler` (module docstring)."""

    if TYPE_CHECKING:  # the scheduler's fields and methods this half uses (scheduler.Scheduler sets them)
        scheduler_config: SchedulerConfig
        block_size: int
        kv: KVCacheManager | HybridCacheManager
        kv_transfers: KVTransfers | None
        requests: dict[str, Request]
        waiting: deque[Request]
        running: list[Request]
        draft_control: DraftControl
        spec_counters: SpecDecodeCounters
        _pool_tokens: int
        _scheduled: dict[int, list[tuple[Request, int]]]
        _ended: list[EngineCoreOutput]

        def _recompute(self, req: Request) -> None: ...
        def _release(self, req: Request) -> None: ...

    def update_from_output(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Take the sampled tokens of a step: append, check stops, cache full
        blocks, free finished requests. One output per request that got a token."""
        if runner_out.step_id != sched_out.step_id:
            raise ValueError(f"ModelRunnerOutput.step_id={runner_out.step_id} is invalid: "
                             f"it must answer SchedulerOutput.step_id={sched_out.step_id}.")
        if self.kv.step_taken is not None:  # the step ran: its state checkpoints are written (hybrid_cache.py)
            self.kv.step_taken(sched_out.step_id)
        if runner_out.kv_transfers_done and self.kv_transfers is not None:
            for req in self.kv_transfers.take_report(runner_out.kv_transfers_done):
                self._recompute(req)  # its KV load failed
        outputs: list[EngineCoreOutput] = []
        if self._ended:  # load-only requests ended since the last update (scheduler/load_only.py)
            outputs, self._ended = self._ended, []
        finished: list = []
        sampled, all_logprobs = runner_out.sampled_token_ids, runner_out.logprobs
        prompt_lp = runner_out.prompt_logprobs  # None unless a request that asked for them computed prompt tokens
        routed = runner_out.routed_experts  # likewise: routed experts
        kv, bs = self.kv, self.block_size
        cached_blocks = kv.num_cached_blocks if kv.enable_prefix_caching else None
        running_status, preempted_status = RequestStatus.RUNNING, RequestStatus.PREEMPTED
        max_len, pool_tokens = self.scheduler_config.max_model_len, self._pool_tokens
        # The hot loop of a decode step (once per request per step): attribute reads kept local, the stop rules
        # of _check_stop inlined for the common token that ends nothing.
        spec = sched_out.scheduled_spec_tokens
        for req, written in self._scheduled.pop(sched_out.step_id, ()):
            status = req.status
            rid = req.request_id
            if spec and rid in spec:
                written = self._take_verified(req, written, len(spec[rid]), sampled.get(rid))
            if status is running_status:
                # The step has written this KV: blocks it filled are shareable now (most steps fill none).
                if cached_blocks is not None and written // bs > cached_blocks.get(rid, 0) \
                        and min(written, len(req.all_token_ids)) // bs > cached_blocks.get(rid, 0):
                    kv.cache_blocks(req, written)
            elif status is not preempted_status:
                continue  # finished (a stop, an abort) while the step ran: its row is discarded
            if prompt_lp is not None and req.prompt_logprobs is not None and rid in prompt_lp:
                got = prompt_lp[rid]  # by position: a prompt computed again after a preemption overwrites its own
                req.prompt_logprobs.update(enumerate(got.entries, got.first_position))
            if routed is not None and req.routed_pending is not None and rid in routed:
                req.routed_pending.append(routed[rid])  # in step order: a later one overwrites earlier positions
            tokens = sampled.get(rid)
            # A chunk that did not reach past its last token sampled nothing (a token for it is discarded).
            if tokens is None or not req.num_output_placeholders:
                continue
            req.num_output_placeholders -= 1
            logprobs = all_logprobs.get(rid) if all_logprobs else None
            if len(tokens) != 1:
                eco = self._take_tokens(req, tokens, logprobs, status, finished)
                outputs.append(eco)
                if req.prompt_logprobs is not None:
                    _attach_prompt_logprobs(req, eco)
                if req.routed_pending:
                    eco.routed_experts, req.routed_pending = req.routed_pending, []
                continue
            token = tokens[0]
            out_ids, all_ids = req.output_token_ids, req.all_token_ids
            out_ids.append(token)  # as req.append_output_token, inlined
            all_ids.append(token)
            # Every field passed: a dataclass's default factories would run per output otherwise.
            eco = EngineCoreOutput(rid, tokens, logprobs if logprobs is not None else _NO_LOGPROBS, None, None,
                                   req.num_cached_tokens)
            outputs.append(eco)
            if req.prompt_logprobs is not None:
                _attach_prompt_logprobs(req, eco)
            if req.routed_pending:
                eco.routed_experts, req.routed_pending = req.routed_pending, []
            n_all = len(all_ids)
            if (token in req.stop_check_ids or len(out_ids) >= req.output_limit
                    or n_all >= max_len or n_all > pool_tokens):
                stop = self._check_stop(req, token)
                if stop is not None:
                    req.status = stop
                    eco.finish_reason = stop.finish_reason
                    eco.stop_reason = req.stop_reason
                    eco.timing = (req.first_scheduled_time, req.num_preemptions)
                    finished.append((req, status))
        if finished:
            gone = {id(r) for r, was in finished if was is RequestStatus.RUNNING}
            if gone:
                self.running = [r for r in self.running if id(r) not in gone]
            if len(gone) < len(finished):  # preempted with a token in flight, and that token ended it
                self.waiting = deque(r for r in self.waiting if not r.is_finished)
            for r, _ in finished:
                self._release(r)
            if self.kv_transfers is not None:  # a prefill engine's outputs say where their saved KV is
                ecos = {o.request_id: o for o in outputs}
                for r, _ in finished:
                    ecos[r.request_id].kv_transfer_params = self.kv_transfers.finished_params(r)
        drafts = runner_out.draft_token_ids
        if drafts:
            self.draft_control.seen = True
            requests = self.requests
            for rid, draft in drafts.items():
                req = requests.get(rid)
                if req is not None and req.status is running_status:
                    req.spec_token_ids = draft
        return outputs

    def _take_verified(self, req: Request, written: int, num_drafts: int, tokens: list[int] | None) -> int:
        """A request that verified `num_drafts` drafts this step and got `tokens` (the accepted drafts and one
        more): its computed tokens go back past the first rejected draft (scheduler/spec_decode.py). Returns the
        KV end the step leaves valid."""
        accepted = len(tokens) - 1 if tokens else 0
        if not 0 <= accepted <= num_drafts:
            raise ValueError(f"ModelRunnerOutput.sampled_token_ids[{req.request_id!r}] has {len(tokens or ())} "
                             f"tokens for {num_drafts} verified drafts: give the accepted drafts and one more.")
        rejected = num_drafts - accepted
        if req.status is RequestStatus.RUNNING:  # preempted or finished meanwhile: nothing computed is kept
            req.num_computed_tokens -= rejected
        self.spec_counters.record(num_drafts, accepted)
        self.draft_control.observe(req, num_drafts, accepted)
        return written - rejected

    def _take_tokens(self, req: Request, tokens: list[int], logprobs: list | None, status: RequestStatus,
                     finished: list) -> EngineCoreOutput:
        """The several-token case of update_from_output (its placeholder already taken back): append up to the
        first token that ends the request; only the first while a later step of the request is in flight."""
        if not tokens:
            raise ValueError(f"ModelRunnerOutput.sampled_token_ids[{req.request_id!r}]=[] is invalid: a request "
                             "that sampled has at least one new token.")
        if logprobs is not None and len(logprobs) != len(tokens):
            raise ValueError(f"ModelRunnerOutput.logprobs[{req.request_id!r}] has {len(logprobs)} entries for "
                             f"{len(tokens)} tokens: give one per token.")
        keep = 1 if req.num_output_placeholders else len(tokens)
        stop = None
        for i in range(keep):
            token = tokens[i]
            req.append_output_token(token)
            stop = self._check_stop(req, token)
            if stop is not None:
                keep = i + 1
                break
        kept = tokens if keep == len(tokens) else tokens[:keep]
        eco = EngineCoreOutput(req.request_id, kept, [] if logprobs is None else logprobs[:keep], None, None,
                               req.num_cached_tokens)
        if stop is not None:
            req.status = stop
            eco.finish_reason = stop.finish_reason
            eco.stop_reason = req.stop_reason
            eco.timing = (req.first_scheduled_time, req.num_preemptions)
            finished.append((req, status))
        return eco

    def _check_stop(self, req: Request, token: int) -> RequestStatus | None:
        """The stop rules for `token`, just appended to `req` (None: it goes on)."""
        n_out = req.num_output_tokens
        if token in req.eos_token_ids and not req.ignore_eos and n_out >= req.min_tokens:
            return RequestStatus.FINISHED_STOPPED
        if token in req.stop_token_ids and n_out >= req.min_tokens:
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if req.max_tokens is not None and n_out >= req.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if req.num_tokens >= self.scheduler_config.max_model_len or req.num_tokens > self._pool_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None


# The new_logprobs of an output whose request asked for none: one shared empty sequence, not a list per output.
_NO_LOGPROBS: tuple = ()


def _attach_prompt_logprobs(req: Request, eco: EngineCoreOutput) -> None:
    """The request's first output carries its prompt logprobs, one per prompt token after the first (vLLM's)."""
    got = req.prompt_logprobs
    if got is None or req.prompt_logprobs_sent:
        return
    eco.prompt_logprobs = [got.get(p) for p in range(1, len(req.prompt_token_ids))]
    req.prompt_logprobs_sent = True
    got.clear()
