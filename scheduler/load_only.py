"""Requests that can only load their prompt's KV, never compute it (`Request.must_load`): a decode request of
prefill/decode disaggregation whose images came without pixels (smg's PD mode sends the decode leg the grids alone;
docs/multimodal.md). After its load such a request computes its last prompt token (not an image's: checked when it
is added) and its outputs, as any loaded request does. What would compute its prompt again ends it instead, with
finish_reason "error" and the reason (never computed as text): a failed load, a preemption, a requeue after a lost
rank. A KV preemption picks another victim first (`kv_victim`), so one ends only when it is the only candidate.

`LoadOnlyMixin` is part of `scheduler.Scheduler`; the ended requests' outputs go out with the next
update_from_output (scheduler/step_output.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .engine_output import EngineCoreOutput
from .request import Request, RequestStatus


class LoadOnlyMixin:
    """Ending a load-only request where it would be recomputed (module docstring)."""

    if TYPE_CHECKING:  # the scheduler's fields and methods this half uses (scheduler.Scheduler sets them)
        running: list[Request]
        _ended: list[EngineCoreOutput]

        def _release(self, req: Request) -> None: ...

    def _end_load_only(self, req: Request, what: str) -> None:
        """End `req` (out of every queue already; its blocks, if any, still its own) with an error naming why."""
        req.status = RequestStatus.FINISHED_ERROR
        self._release(req)  # its blocks freed, its id to the worker
        self._ended.append(EngineCoreOutput(
            req.request_id, finish_reason="error", num_cached_tokens=req.num_cached_tokens,
            stop_reason=f"request {req.request_id!r} ended: {what}, and {req.must_load}."))

    def _kv_victim(self, start: int) -> Request:
        """The running request to preempt when the pool runs dry (one client): the latest admitted at index >=
        `start` that can be recomputed, else the latest (which then ends)."""
        running = self.running
        for j in range(len(running) - 1, start - 1, -1):
            if not running[j].must_load:
                return running.pop(j)
        return running.pop()


__all__ = ["LoadOnlyMixin"]
