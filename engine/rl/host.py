"""What the RL control calls need of the engine that holds them (`RLHost`), and no more: `LLMEngine` is one, and
builds its `RLControl` (engine/rl/control.py) with itself. The engine's executor, configuration and schedulers are
read through the host at each call, never kept: an elastic regroup or a rejoin replaces them
(engine/cluster/elastic.py, rejoin.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from moelink.scheduler.interface import SchedulerInterface

    from ..config.engine_args import EngineConfig
    from ..contract.worker_api import RankCall


class RankCalls(Protocol):
    """The executor's one call RL makes: a Worker method on every rank together (engine/contract/worker_api.py),
    results in rank order."""

    def collective(self, method: RankCall, *args: object) -> list: ...


class RLHost(Protocol):
    """The engine as its RL control calls see it (the stepping thread's; check_disk_update reads `config` alone)."""

    @property
    def executor(self) -> RankCalls: ...

    @property
    def config(self) -> EngineConfig: ...

    @property
    def schedulers(self) -> Sequence[SchedulerInterface]: ...

    def has_unfinished_requests(self) -> bool:
        """Requests added and not finished (those waiting for an adapter's read too)."""
        ...

    def scheduled_request_ids(self) -> list[str]:
        """The requests the schedulers hold (what pause_generation("abort") ends)."""
        ...

    def abort_requests(self, request_ids: list[str], reason: str = "abort") -> Sequence[object]:
        """End requests now, with their final outputs."""
        ...

    def drain_for_update(self) -> None:
        """Collect the step in flight before any rank writes, its outputs kept for their reader."""
        ...
