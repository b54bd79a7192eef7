"""Token-budget continuous-batching scheduler (vLLM v1 style).

There is no prefill phase and no decode phase. Each step hands out a budget
of `max_num_batched_tokens` tokens: first to the running requests in priority
order (a decode needs 1 token, an unfinished prompt chunk needs the rest of
its prompt), then to waiting requests first-come-first-served, chunking a long
prompt over several steps. When KV blocks run out for a running request, the
latest-arrived running request is preempted by recompute: it drops its blocks
and goes back to the front of the waiting queue, keeping its output tokens.

`num_computed_tokens` is advanced when a step is scheduled, so a request whose
chunk reaches its last token is "fully computed" once the step has run, and
`update_from_output` (scheduler/step_output.py) appends the sampled tokens. Per step the work is
O(running requests + new blocks); no step rescans whole token lists.

Overlapped loop (async scheduling): step N+1 may be scheduled before step N's
output is taken. A request whose step N samples holds a placeholder
(`Request.num_output_placeholders`) until its token comes back; step N+1 then
computes the position after its last known token (the worker feeds it the
token from the device). A request whose placeholder alone would end it
(max_tokens, max_model_len, the pool) is not scheduled again; one that stops
on a token (EOS, a stop id, a stop string) or is aborted wastes at most its
row of the step in flight, which `update_from_output` discards. A request
preempted while its token is in flight takes that token when it comes back,
and is not readmitted before.

KV connector (optional, scheduler/kv_connector.py): requests whose KV another engine saved are loaded instead of
computed (they wait in WAITING_FOR_KV holding their blocks, then are admitted ahead of the waiting queue), and
prompt KV is saved after the step that computes it. Without one (`kv_connector=None`) nothing of it runs.
"""
from __future__ import annotations

import dataclasses
import time

from bisect import insort
from collections import deque
from collections.abc import Iterable

from .config import CacheConfig, SchedulerConfig
from .draft_control import DraftControl
from .engine_output import SchedulerStats
from .fairness import ClientFairness
from .block_pool import root_block_hash
from .kv_cache_manager import KVCacheManager
from .kv_connector import KVConnector, KVTransfers
from .hybrid_cache import HybridCacheManager
from .sliding_kv import SlidingKVCacheManager
from .spec_decode import SpecDecodeCounters, take_drafts
from .outputs import CachedRequestData, NewRequestData, RequestResync, SchedulerOutput
from .load_only import LoadOnlyMixin
from .lora_slots import MAX_LORA_SKIPS, LoRAOvertakes, LoRASlotWait
from .recovery import RecoveryMixin
from .request import Request, RequestStatus
from .step_output import StepOutputMixin


def _chunk_limits(*limits):
    """One `chunk_limit(req, start, n) -> n'` applying each given one (None entries skipped); None when none."""
    limits = [f for f in limits if f is not None]
    if len(limits) <= 1:
        return limits[0] if limits else None

    def limit(req: Request, start: int, n: int) -> int:
        for f in limits:
            n = f(req, start, n)
        return n
    return limit


class Scheduler(StepOutputMixin, RecoveryMixin, LoadOnlyMixin):
    """Decides, each step, which requests compute how many tokens on one rank.

    Typical loop (the engine's)::

        sched_out = scheduler.schedule()
        runner_out = executor.execute(sched_out)
        for out in scheduler.update_from_output(sched_out, runner_out): ...

    `finish_requests` may be called between steps (aborts, stop strings).
    Not thread-safe: one engine thread owns it.
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 kv_connector: KVConnector | None = None) -> None:
        if cache_config.num_kv_blocks is None:
            raise ValueError("CacheConfig.num_kv_blocks=None is invalid for the Scheduler: "
                             "set it (the engine measures free memory) before building one.")
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        self.block_size = cache_config.block_size
        # The KV policy: with a sliding window set, that group keeps its own table (scheduler/sliding_kv.py); the
        # scheduler asks the manager (decode_tables, new_step_extras, blocks_alone, ...) and never which it is.
        self.kv: KVCacheManager | HybridCacheManager
        if cache_config.sliding_window is not None:
            self.kv = SlidingKVCacheManager(cache_config.num_kv_blocks, cache_config.block_size,
                                            cache_config.enable_prefix_caching, cache_config.sliding_window,
                                            scheduler_config.max_num_batched_tokens,
                                            cache_config.block_hash_lookahead)
        else:
            self.kv = KVCacheManager(cache_config.num_kv_blocks, cache_config.block_size,
                                     cache_config.enable_prefix_caching, cache_config.block_hash_lookahead)
        if cache_config.num_state_slots:  # linear-attention layers: a state slot per request beside its blocks
            self.kv = HybridCacheManager(self.kv, cache_config.num_state_slots, cache_config.num_state_checkpoints)
        # The longest sequence whose KV fits the whole pool: a request is
        # finished ("length") before it outgrows it, else it could never be
        # scheduled again, even alone.
        self._pool_tokens = self.kv.max_tokens_alone()

        self.requests: dict[str, Request] = {}  # every unfinished request
        self.waiting: deque[Request] = deque()
        # Sorted by priority (arrival time, then add order), so the running
        # loop serves the oldest first and the preemption victim is running[-1].
        self.running: list[Request] = []
        # Requests the engine holds back from scheduling for now (their next grammar mask is still being filled,
        # engine/core/structured_output.py); the engine adds and removes ids, the scheduler only reads them.
        self.held: set[str] = set()
        # Requests whose consumer lags behind their outputs (engine/api/output_thread.py Stream.backlog): not
        # scheduled until it catches up, keeping their KV and sequence slot (a short stall resumes without recompute;
        # the front ends a stream that stalls for long). The engine adds and removes ids; `_release` forgets them.
        self.backlogged: set[str] = set()
        # False while the engine's generation is paused (engine/rl/control.py): requests never scheduled wait;
        # started ones (running, preempted, loading) go on.
        self.admit_new: bool = True
        self._priority: dict[str, tuple[float, int]] = {}
        self._num_added = 0
        # Finished or aborted since the last schedule(); the worker drops them.
        self._finished_req_ids: set[str] = set()
        # Load-only requests ended since the last update_from_output (scheduler/load_only.py): their outputs.
        self._ended: list = []
        self._step_id = 0
        self.num_preemptions_total = 0
        self._resync: RequestResync | None = None  # elastic EP: sent with the next step (rewind)
        # Per step not yet taken by update_from_output: (request, tokens whose KV the step leaves written). The
        # request objects, not ids: an id finished and reused while a step was in flight is another request.
        self._scheduled: dict[int, list[tuple[Request, int]]] = {}
        # KV loads and saves through a connector (scheduler/kv_connector.py); None: no connector, no cost.
        self.kv_transfers = KVTransfers(kv_connector, self.kv) if kv_connector is not None else None
        # Where prompt chunks must end (None: anywhere): a hybrid model's state checkpoints, and its state saved for
        # another engine at the prompt's n - 1 (kv_connector.KVTransfers.chunk_limit).
        self._chunk_limit = _chunk_limits(self.kv.chunk_limit, getattr(self.kv_transfers, "chunk_limit", None))
        self.spec_counters = SpecDecodeCounters()  # speculative decoding (scheduler/spec_decode.py)
        self.draft_control = DraftControl(scheduler_config)  # how many drafts each step verifies (draft_control.py)
        self.fairness = ClientFairness(scheduler_config)  # per-client shares of slots and tokens (fairness.py)
        self._fair_step = None  # this step's shares while schedule() runs; None: one client (or fairness off)
        # Across steps: how long the first request waiting for a LoRA slot was overtaken (lora_slots.py).
        self.lora_overtakes = LoRAOvertakes()

    # ---------------------------------------------------------------- requests
    def add_request(self, req: Request) -> None:
        """Queue a new request; ValueError if it can never run or its id is taken."""
        rid = req.request_id
        if rid in self.requests:
            raise ValueError(f"Request.request_id={rid!r} is invalid: an unfinished request already uses it.")
        if req.status is not RequestStatus.WAITING or req.num_computed_tokens or req.num_output_tokens:
            raise ValueError(f"Request {rid!r} is invalid: only fresh requests (WAITING, no outputs) can be added.")
        n = req.num_tokens
        max_len = self.scheduler_config.max_model_len
        if n > max_len:
            raise ValueError(f"Request {rid!r} is invalid: its prompt has {n} tokens, more than "
                             f"SchedulerConfig.max_model_len={max_len}.")
        if n > self._pool_tokens:
            raise ValueError(f"Request {rid!r} is invalid: its {n}-token prompt needs "
                             f"{self._blocks_alone(n)} KV blocks, more than the whole pool "
                             f"(CacheConfig.num_kv_blocks={self.cache_config.num_kv_blocks}).")
        self.requests[rid] = req
        self._priority[rid] = (req.arrival_time, self._num_added)
        self._num_added += 1
        self.waiting.append(req)
        self.fairness.added(req)
        if self.kv_transfers is not None:
            self.kv_transfers.added(req)

    def _blocks_alone(self, n: int) -> int:
        """Blocks a request of n tokens may hold at once (both tables' when the sliding group has its own)."""
        return self.kv.blocks_alone(n)

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """End requests from outside the step loop (abort, stop string found by
        the detokenizer). Unknown or already finished ids are ignored. Their
        blocks are freed now; their ids reach the worker in the next
        SchedulerOutput.finished_req_ids. No EngineCoreOutput is produced for
        them (the caller already knows), and a token sampled for them by a
        step in flight is dropped by update_from_output."""
        if not status.is_finished:
            raise ValueError(f"finish_requests status={status.name} is invalid: must be a FINISHED_* status.")
        if isinstance(request_ids, str):
            request_ids = (request_ids,)
        reqs = [self.requests[rid] for rid in dict.fromkeys(request_ids) if rid in self.requests]
        if not reqs:
            return
        gone = {id(r) for r in reqs}
        if any(r.status is RequestStatus.RUNNING for r in reqs):
            self.running = [r for r in self.running if id(r) not in gone]
        if any(r.status is not RequestStatus.RUNNING for r in reqs):
            self.waiting = deque(r for r in self.waiting if id(r) not in gone)
        for r in reqs:
            r.status = status
            self._release(r)

    @property
    def pool_tokens(self) -> int:
        """The longest sequence (prompt + outputs) this scheduler runs: its KV fits the pool with nothing else
        running. num_kv_blocks * block_size, or less when the sliding-window group draws on the same pool."""
        return self._pool_tokens

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._ended)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    def outstanding_tokens(self) -> int:
        """Work still owed by this rank, in tokens: prompt tokens not yet computed plus
        output tokens not yet generated (up to each request's max_tokens). The data-
        parallel router balances on it."""
        total = 0
        for r in self.requests.values():
            total += max(r.num_tokens - r.num_computed_tokens, 0)
            if r.max_tokens is not None:
                total += max(r.max_tokens - r.num_output_tokens, 0)
        return total

    def num_cached_prefix_tokens(self, token_ids: list[int], cache_salt: bytes = b"") -> int:
        """How many leading tokens of a prompt (with that cache salt) this rank's prefix cache holds (whole
        blocks)."""
        return len(self.kv.pool.find_cached_prefix(token_ids, root_block_hash(cache_salt))) * self.block_size

    def has_finished_requests(self) -> bool:
        """True if finished ids still wait to be sent to the worker by a schedule(), or KV transfers to be
        started or reported (a connector's: the engine steps until the worker reports them)."""
        return bool(self._finished_req_ids) or (self.kv_transfers is not None and self.kv_transfers.busy)

    # -------------------------------------------------------------------- step
    def schedule(self) -> SchedulerOutput:
        """Plan one step under the token budget (see the module docstring)."""
        self._step_id += 1
        out = SchedulerOutput(step_id=self._step_id, finished_req_ids=self._finished_req_ids, resync=self._resync)
        self._resync = None
        self._finished_req_ids = set()
        budget = self.scheduler_config.max_num_batched_tokens
        # Several clients: their shares, the slots owed to waiting ones taken by preemption, and the running list in
        # fair order for this step's loop (scheduler/fairness.py).
        fair = self._fair_step = self.fairness.begin_step(self, out, budget)
        # Speculative decoding: how many drafts each request verifies this step (scheduler/draft_control.py).
        grants = self.draft_control.plan(self.running, budget, out) if self.draft_control.seen else None

        scheduled = self._scheduled[out.step_id] = []
        cached_reqs, num_scheduled = out.scheduled_cached_reqs, out.num_scheduled_tokens
        # 1) Running requests, oldest first (the hot loop of a decode step: locals, nothing but the request).
        i = 0
        running = self.running
        # While generation is paused (`admit_new` False: a "wait" pause drains the started requests for a weight
        # update) a lagging consumer does not stop its request: the update would wait for that client's reading.
        held_ids, lagging = self.held, self.backlogged if self.admit_new else None
        max_len, pool_tokens = self.scheduler_config.max_model_len, self._pool_tokens
        # allocate_slots' no-new-block case, checked here first (most decode steps) where the policy allows it.
        tables, bs, extras = self.kv.decode_tables, self.block_size, self.kv.new_step_extras
        clip = self._chunk_limit  # None unless prompt chunks must end at given positions (hybrid models)
        while i < len(running) and budget > 0:
            req = running[i]
            known = len(req.all_token_ids)
            in_flight = req.num_output_placeholders
            n = known + in_flight - req.num_computed_tokens
            if n > budget:
                n = budget
            if n > 1 and fair is not None:  # a prompt chunk: within its client's token share (fairness.py)
                n = fair.cap(req, n)
            if clip is not None and req.num_computed_tokens < req.num_prompt_tokens:
                n = clip(req, req.num_computed_tokens, n)
            # Nothing left to compute yet, or the tokens in flight end it whatever they are (its length limits, as
            # in _check_stop; checked inline: this runs for every decoding request of an overlapped loop).
            if n <= 0 or (in_flight and (len(req.output_token_ids) + in_flight >= req.output_limit
                                         or known + in_flight >= max_len or known + in_flight > pool_tokens)) or (
                    held_ids and req.request_id in held_ids) or (lagging and req.request_id in lagging):
                i += 1
                continue
            if req.spec_token_ids:  # drafts to verify (scheduler/spec_decode.py)
                n += take_drafts(req, out, n, in_flight, budget, max_len, pool_tokens, grants)
            held = tables.get(req.request_id) if tables is not None else None
            if held and req.num_computed_tokens + n <= len(held) * bs:
                new_blocks = []
            else:
                new_blocks = self.kv.allocate_slots(req, n)
            while new_blocks is None:
                # The victim is the latest arrival, always at index >= i (the
                # list is sorted), so nothing already scheduled is undone. Several clients: the latest of the one
                # furthest above its share, also at index >= i (the list is in fair order: scheduler/fairness.py).
                victim = self._kv_victim(i) if fair is None else fair.kv_victim(i)
                if self._preempt(victim):
                    out.preempted_req_ids.add(victim.request_id)
                if victim is req:
                    break
                new_blocks = self.kv.allocate_slots(req, n)
            if new_blocks is None:
                out.scheduled_spec_tokens.pop(req.request_id, None)
                continue  # req preempted itself: the next request (if any, a fair choice) is at index i now
            cached = CachedRequestData(req.request_id, new_blocks, req.num_computed_tokens)
            if extras is not None:
                extras(cached)
            cached_reqs.append(cached)
            num_scheduled[req.request_id] = n
            computed = req.num_computed_tokens = req.num_computed_tokens + n
            scheduled.append((req, computed))  # as _note_scheduled, inlined
            if computed >= known + in_flight:  # reaches its last token (past it: verified drafts)
                req.num_output_placeholders = in_flight + 1
            budget -= n
            i += 1

        if fair is not None:
            fair.end_running()  # the running list back in priority order
        # 2) Waiting requests, FCFS. Not after a preemption: blocks are short,
        # and re-admitting the request just preempted would only thrash. (A fair-share preemption made a slot for
        # a waiting client: that one comes first.)
        if len(out.preempted_req_ids) == (fair.num_preempted if fair is not None else 0):
            if fair is not None:
                fair.order_waiting()
            self._schedule_waiting(out, budget, scheduled)
        self._fair_step = None

        if self.kv.plan_step is not None:  # state checkpoints saved after this step (hybrid_cache.py)
            out.state_saves = self.kv.plan_step(out.step_id, scheduled)
        out.total_num_scheduled_tokens = sum(out.num_scheduled_tokens.values())
        if self.kv_transfers is not None:
            out.kv_transfers = self.kv_transfers.plan(out.num_scheduled_tokens)
        return out

    def _note_scheduled(self, scheduled: list, req: Request) -> None:
        """Record what the step writes for `req`; a chunk that reaches past its last known token samples."""
        scheduled.append((req, req.num_computed_tokens))
        if req.num_computed_tokens == req.num_tokens + req.num_output_placeholders:
            req.num_output_placeholders += 1

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, scheduled: list) -> None:
        max_seqs = self.scheduler_config.max_num_seqs
        kvt = self.kv_transfers
        if kvt is not None:
            # Loaded by the connector: admitted first (they hold their blocks). Loads still on the network hold no
            # sequence slot: the connector bounds them (scheduler/kv_connector.py LoadLimits).
            while kvt.ready and budget > 0 and len(self.running) < max_seqs:
                req = kvt.ready[0]
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if self.kv.allocate_slots(req, n) is None:
                    break
                kvt.ready.popleft()
                budget -= self._start_running(req, out, n, req.num_computed_tokens, scheduled)
            max_seqs -= len(kvt.ready)
        # Requests of an adapter waiting for a LoRA slot this step, taken off the queue's front in order and put
        # back there after the loop (`finally`): the requests behind them that need no slot run meanwhile.
        skipped: list[Request] = []
        try:
            self._schedule_waiting_fcfs(out, budget, scheduled, max_seqs, skipped)
        finally:
            if skipped:
                self.waiting.extendleft(reversed(skipped))

    def _schedule_waiting_fcfs(self, out: SchedulerOutput, budget: int, scheduled: list, max_seqs: int,
                               skipped: list[Request]) -> None:
        kvt = self.kv_transfers
        slots = (LoRASlotWait(self.running, self.scheduler_config, self.lora_overtakes)
                 if self.scheduler_config.max_loras else None)
        while self.waiting and budget > 0 and len(self.running) < max_seqs:
            req = self.waiting[0]
            if not self.admit_new and req.status is RequestStatus.WAITING:
                break  # paused: nothing new starts (FCFS: a preempted request is at the front, ahead of it)
            if req.num_output_placeholders or (self.held and req.request_id in self.held):
                # Preempted with its token in flight: recomputed once the token is known; or held by the engine
                # (its grammar mask is being filled: milliseconds). FCFS: all wait.
                break
            if self.backlogged and self.admit_new and req.request_id in self.backlogged:
                # Its consumer lags (`backlogged`), possibly for long: the requests behind it go on, as past an
                # adapter waiting for a slot (the same bounded scan).
                self.waiting.popleft()
                skipped.append(req)
                if len(skipped) >= MAX_LORA_SKIPS:
                    break
                continue
            if req.lora_id and slots is not None and slots.waits(req):
                # Its adapter would be one more than the ranks' slots: it waits, and the requests behind it that
                # need no new slot (the base model's, a resident adapter's) go on in order (vLLM skips it too).
                self.waiting.popleft()
                skipped.append(req)
                if len(skipped) >= MAX_LORA_SKIPS:
                    break  # a bounded scan a step: past this many, the rest waits as FCFS
                continue
            if not req.computes_whole_prompt:
                hits, num_hit = self.kv.get_computed_blocks(req)
            else:  # prompt logprobs, routed experts: every prompt token is computed here (as vLLM's prompt logprobs)
                hits, num_hit = [], 0
            if kvt is not None and kvt.moves_state and num_hit and not kvt.hit_usable(req, num_hit):
                hits, num_hit = [], 0  # a state saved for another engine needs a step ending at its save point
            if kvt is not None and req.status is RequestStatus.WAITING and not req.computes_whole_prompt:
                k = kvt.loadable(req)
                if k > num_hit:  # the connector has more of its KV than the prefix cache: load it
                    if self.kv.allocate_slots(req, k - num_hit, hits) is None:
                        break
                    self.waiting.popleft()
                    self.kv.pool.record_prefix_query(req.num_tokens, num_hit)
                    req.num_cached_tokens = num_hit
                    kvt.start_load(req, num_hit, k)
                    continue
                if req.must_load and not k and kvt.connector.num_loadable_tokens(req):
                    break  # past a load bound: it waits for a load in flight to end (it cannot be computed instead)
            if req.must_load and num_hit < req.num_prompt_tokens - 1:
                # Its prompt not loaded (a requeue after a lost rank): computing it would need its images' pixels.
                self.waiting.popleft()
                self._end_load_only(req, "its prompt's KV was not loaded here")
                continue
            n = min(req.num_tokens - num_hit, budget)
            if self._fair_step is not None:  # within its client's token share (scheduler/fairness.py)
                n = self._fair_step.cap(req, n)
            if self._chunk_limit is not None:
                n = self._chunk_limit(req, num_hit, n)
            if self.kv.allocate_slots(req, n, hits) is None:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.kv.pool.record_prefix_query(req.num_tokens, num_hit)
            if req.status is RequestStatus.WAITING:  # not for a resumed preemption
                req.num_cached_tokens = num_hit
            budget -= self._start_running(req, out, n, num_hit, scheduled)
            if slots is not None and req.lora_id:
                slots.running.add(req.lora_id)

    def _start_running(self, req: Request, out: SchedulerOutput, n: int, num_computed: int, scheduled: list) -> int:
        """Admit `req` (its blocks allocated, `num_computed` tokens of KV in them) computing `n` tokens this step;
        returns n."""
        rid = req.request_id
        req.status = RequestStatus.RUNNING
        if req.first_scheduled_time is None:
            req.first_scheduled_time = time.monotonic()
        out.scheduled_new_reqs.append(self._new_request_data(req, num_computed))
        out.num_scheduled_tokens[rid] = n
        req.num_computed_tokens = num_computed + n
        self._note_scheduled(scheduled, req)
        insort(self.running, req, key=lambda r: self._priority[r.request_id])
        return n

    def _new_request_data(self, req: Request, num_computed: int) -> NewRequestData:
        """What the worker needs to hold `req` (copies: with an in-process worker these lists must not alias
        ours)."""
        rid = req.request_id
        new = NewRequestData(
            req_id=rid, prompt_token_ids=list(req.prompt_token_ids),
            output_token_ids=list(req.output_token_ids), sampling_params=req.sampling_params,
            block_ids=list(self.kv.get_block_ids(rid)), num_computed_tokens=num_computed, lora=req.lora,
            multimodal=req.multimodal)
        self.kv.fill_new_request(new)
        return new

    def _recompute(self, req: Request) -> None:
        """A request whose KV load failed: its blocks freed, recomputed like a preempted request (at the front); a
        load-only one ends (scheduler/load_only.py)."""
        if req.must_load:
            self._end_load_only(req, "its KV load failed (nothing saved under its kv_transfer_params: the prefill "
                                     "engine's remote_kv_token and mm_hashes, or that engine unreachable)")
            return
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        self.waiting.appendleft(req)

    def _preempt(self, req: Request) -> bool:
        """Preempt by recompute: drop its KV, keep its tokens, requeue at the front. A load-only request ends instead
        (scheduler/load_only.py): False."""
        if req.must_load:
            self._end_load_only(req, "preempted (the KV pool ran out of blocks), its prompt cannot be recomputed")
            return False
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(req)
        return True

    def _release(self, req: Request) -> None:
        """Forget a finished request (already out of running/waiting)."""
        self.kv.free(req)
        rid = req.request_id
        del self.requests[rid]
        del self._priority[rid]
        self.backlogged.discard(rid)
        self.fairness.removed(req)
        self._finished_req_ids.add(rid)
        if self.kv_transfers is not None:
            self.kv_transfers.forget(req)

    # ------------------------------------------------------------------- stats
    def stats(self) -> SchedulerStats:
        """A snapshot; requests a KV connector is loading count as waiting."""
        pool = self.kv.pool
        holding = self.kv_transfers.num_holding if self.kv_transfers is not None else 0
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting) + holding, kv_usage=pool.usage,
            num_free_blocks=pool.num_free_blocks, num_total_blocks=pool.num_blocks,
            prefix_cache_queries=pool.prefix_cache_queries, prefix_cache_hits=pool.prefix_cache_hits,
            num_preemptions_total=self.num_preemptions_total,
            spec_decode=self.spec_counters.copy() if self.spec_counters.num_verify_rows else None,
            kv_transfer=None if self.kv_transfers is None else self.kv_transfers.counters_now())

    def reset_prefix_cache(self) -> int:
        """Forget all cached prefixes (e.g. after a weight update)."""
        return self.kv.reset_prefix_cache()

    def started_request_ids(self) -> list[str]:
        """Requests that have been scheduled at least once (running, preempted, loading KV): they hold KV or tokens."""
        return [rid for rid, r in self.requests.items() if r.status is not RequestStatus.WAITING]

    def exclude_from_prefix_cache(self, request_ids: Iterable[str]) -> None:
        """Never cache these requests' blocks from now on (their KV mixes weight versions: an update while they
        were held, engine/rl/control.py)."""
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self.kv.exclude_from_prefix_cache(req)

    def check_invariants(self) -> None:
        """AssertionError on inconsistent state (for tests; O(all blocks))."""
        pool = self.kv.pool
        pool.check_invariants()
        self.kv.check_invariants()
        assert len(self.running) <= self.scheduler_config.max_num_seqs
        kvt = self.kv_transfers
        holding = kvt.holding() if kvt is not None else []  # loading or loaded through the KV connector
        running_ids = [r.request_id for r in self.running]
        waiting_ids = [r.request_id for r in self.waiting] + [r.request_id for r in holding]
        assert len(set(running_ids) | set(waiting_ids)) == len(running_ids) + len(waiting_ids), "request queued twice"
        assert set(running_ids) | set(waiting_ids) == set(self.requests), "queues and request map disagree"
        assert kvt is None or kvt.within_limits()
        keys = [self._priority[r] for r in running_ids]
        assert keys == sorted(keys), "running list out of priority order"
        refs = [0] * pool.num_blocks
        for r in self.running:
            assert r.status is RequestStatus.RUNNING
            for b in self.kv.check_request_blocks(r):
                refs[b] += 1
        for r in holding:
            assert r.status is RequestStatus.WAITING_FOR_KV
            for b in self.kv.check_request_blocks(r):
                refs[b] += 1
        for b in kvt.transfer_refs() if kvt is not None else ():
            refs[b] += 1
        for r in self.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert not self.kv.get_block_ids(r.request_id) and r.num_computed_tokens == 0
        assert self.kv.num_requests_holding_blocks == len(self.running) + len(holding)
        assert refs == pool.ref_counts(), "ref counts != block tables"
        self.fairness.check(self.requests.values())
        assert self.backlogged <= self.requests.keys(), "a backlogged id outlived its request"
