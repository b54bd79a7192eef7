"""Elastic EP on one rank's scheduler: taking over the requests of a lost rank (`requeue`) and undoing the steps a
loss broke on a survivor that kept its model runner (`rewind`, which sends the worker every request state afresh
with the next step: `SchedulerOutput.resync`).

`RecoveryMixin` is part of `scheduler.Scheduler` (scheduler.py plans steps, step_output.py takes their outputs);
it uses the scheduler's fields. The engine side is engine/cluster/elastic.py.
"""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from .outputs import NewRequestData, RequestResync, SchedulerOutput
from .request import Request, RequestStatus

if TYPE_CHECKING:
    from .fairness import ClientFairness
    from .hybrid_cache import HybridCacheManager
    from .kv_cache_manager import KVCacheManager
    from .kv_connector import KVTransfers


class RecoveryMixin:
    """`requeue` and `rewind` of `scheduler.Scheduler` (module docstring)."""

    if TYPE_CHECKING:  # the scheduler's fields and methods this half uses (scheduler.Scheduler sets them)
        kv: KVCacheManager | HybridCacheManager
        kv_transfers: KVTransfers | None
        requests: dict[str, Request]
        waiting: deque[Request]
        running: list[Request]
        fairness: ClientFairness
        _priority: dict[str, tuple[float, int]]
        _num_added: int
        _scheduled: dict[int, list[tuple[Request, int]]]
        _resync: RequestResync | None

        def _recompute(self, req: Request) -> None: ...
        def _preempt(self, req: Request) -> bool: ...
        def _new_request_data(self, req: Request, num_computed: int) -> NewRequestData: ...

    def requeue(self, req: Request) -> None:
        """Queue a request taken over from a scheduler that is gone (elastic EP: its rank was lost). It keeps
        its prompt and output tokens and is recomputed like a preempted request: no KV blocks, nothing
        computed, waiting in arrival order behind the requests already here."""
        rid = req.request_id
        if rid in self.requests:
            raise ValueError(f"Request.request_id={rid!r} is invalid: an unfinished request already uses it.")
        if req.is_finished:
            raise ValueError(f"Request {rid!r} is invalid: it is finished ({req.status.name}); only unfinished "
                             "requests can be requeued.")
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_output_placeholders = 0  # the lost rank's step in flight never answers
        req.num_requeues += 1
        self.requests[rid] = req
        self._priority[rid] = (req.arrival_time, self._num_added)
        self._num_added += 1
        self.waiting.append(req)
        self.fairness.added(req)

    def rewind(self, failed: SchedulerOutput | list[SchedulerOutput] | None) -> None:
        """Elastic EP, this rank survived a loss and kept its runner (engine/rank/keep_runner.py): undo the step
        `failed` that never completed (None: the loss came between steps), so each running request is computed
        up to where it was before it, and send the worker every request state afresh with the next step
        (`SchedulerOutput.resync`): the broken step may have reached the worker or not, run there or not. The
        KV of what was computed before stays in the blocks; a request keeps blocks it got for the broken step
        (the next step needs them again). Nothing is recomputed but that one step."""
        steps = [] if failed is None else failed if isinstance(failed, list) else [failed]
        for so in reversed(steps):  # an overlapped loop has two in flight: the newest is undone first
            self._scheduled.pop(so.step_id, None)
            for rid, n in so.num_scheduled_tokens.items():
                req = self.requests.get(rid)
                if req is not None and req.status is RequestStatus.RUNNING:
                    req.num_computed_tokens -= n
        for req in self.requests.values():
            req.num_output_placeholders = 0  # their tokens never come back: recomputed
        if self.kv_transfers is not None:  # whether the broken steps' transfers ran is unknown: failed
            for req in self.kv_transfers.fail_all():
                self._recompute(req)
        if self.kv.steps_dropped is not None:
            # Per-sequence state (linear attention) is updated in place: whether the broken step ran is unknown, so
            # its state cannot be trusted the way rewritten KV can. Every running request is recomputed.
            self.kv.steps_dropped()
            for req in reversed(self.running):
                self._preempt(req)
            self.running = []
        self._resync = RequestResync([self._new_request_data(r, r.num_computed_tokens) for r in self.running],
                                     frozenset(r.request_id for r in self.waiting))
