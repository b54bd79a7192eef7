"""What the engine core drives a rank's scheduler through: the `SchedulerInterface` protocol.

`scheduler.Scheduler` (token budget, FCFS, preemption by recompute) is the one implementation today; the engine
(engine/core/llm_engine.py, elastic.py, rejoin.py) and the data-parallel router use nothing beyond this, so another
policy (priority, a disaggregated prefill/decode pool) plugs in by implementing it.
tests/scheduler/test_interface.py checks that Scheduler does, with these signatures.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from .engine_output import EngineCoreOutput, SchedulerStats
from .outputs import ModelRunnerOutput, SchedulerOutput
from .request import Request, RequestStatus


class SchedulerInterface(Protocol):
    """One rank's scheduler as the engine core sees it (see the module docstring)."""

    @property
    def requests(self) -> Mapping[str, Request]:
        """Every unfinished request, by id."""

    @property
    def pool_tokens(self) -> int:
        """The longest sequence (prompt + outputs) this rank can run."""

    @property
    def held(self) -> set[str]:
        """Ids of requests the engine holds back from scheduling for now (their next grammar mask is still being
        filled, engine/core/structured_output.py): the engine adds and removes them, the scheduler only reads."""

    @property
    def backlogged(self) -> set[str]:
        """Ids of requests whose consumer lags behind their outputs (engine/api/output_thread.py Stream.backlog_limit):
        not scheduled, keeping their KV and slot, until it catches up (or generation is paused: `admit_new`). The
        engine adds and removes them; the scheduler reads them and forgets an id with its request."""

    @property
    def admit_new(self) -> bool:
        """False while the engine's generation is paused: requests never scheduled wait, started ones go on."""

    @admit_new.setter
    def admit_new(self, value: bool) -> None: ...

    def started_request_ids(self) -> list[str]:
        """Requests scheduled at least once (they hold KV or tokens)."""

    def exclude_from_prefix_cache(self, request_ids: Iterable[str]) -> None:
        """Never cache these requests' blocks from now on."""

    def add_request(self, req: Request) -> None:
        """Queue a new request; ValueError if it can never run or its id is taken."""

    def schedule(self) -> SchedulerOutput:
        """Plan one step."""

    def update_from_output(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput) -> list[EngineCoreOutput]:
        """Take a step's sampled tokens; one output per request that got a token."""

    def finish_requests(self, request_ids: str | Iterable[str], status: RequestStatus) -> None:
        """End requests from outside the step loop (aborts, stop strings)."""

    def has_unfinished_requests(self) -> bool: ...

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (a weight update, a flush); the blocks freed."""

    def has_finished_requests(self) -> bool:
        """Finished ids still to be sent to the worker with a step, or KV transfers still to be reported."""

    def stats(self) -> SchedulerStats: ...

    def outstanding_tokens(self) -> int:
        """Work still owed, in tokens (the router balances on it)."""

    def num_cached_prefix_tokens(self, token_ids: list[int], cache_salt: bytes = b"") -> int:
        """Leading tokens of a prompt (with that cache salt) this rank's prefix cache holds."""

    def requeue(self, req: Request) -> None:
        """Take over a request from a rank that is gone (elastic EP)."""

    def rewind(self, failed: SchedulerOutput | list[SchedulerOutput] | None) -> None:
        """Undo the steps a lost rank broke (elastic EP, this rank kept its runner)."""


__all__ = ["SchedulerInterface"]
