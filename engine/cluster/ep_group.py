"""The EP group's membership as one value: who the ranks are and what they run, changed only by transitions.

A Ray executor holds one `EPGroup` (`RayExecutor.group`). Every change of membership (a rank lost, replacements
admitted, the group formed at start) builds the next group from the last one (`EPGroup.next`, `survivors`) and
hands it to the executor in one call (`RayExecutor.adopt` / `commit`); nothing edits the executor's fields one
by one. Rank i of the group is `workers[i]`, whose process is `rank_pids[i]`, on Ray node `node_ids[i]`, in
placement-group bundle `bundles[i]` (a survivor keeps its bundle; rank r starts in bundle r).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..config.engine_args import EngineConfig
from ..contract.expert_parallel import ExpertParallelPlan


@dataclass(frozen=True)
class EPGroup:
    """One membership of the expert-parallel group (see the module docstring). `epoch` is 0 for the group
    formed at start and grows by one with each transition, so a holder can tell two groups apart."""

    epoch: int
    config: EngineConfig  # this group's (its expert_parallel_size is the group's size)
    plan: ExpertParallelPlan  # what the ranks run
    bundles: tuple[int, ...]  # placement-group bundle of each rank
    workers: tuple = ()  # the ranks' actors; empty while the group is being started
    rank_pids: tuple[int, ...] = ()
    node_ids: tuple[str, ...] = ()  # Ray node id of each rank's bundle (empty when unknown)
    master_addr: str | None = None  # the torch.distributed rendezvous of this group
    master_port: int | None = None

    def __post_init__(self) -> None:
        n = len(self.bundles)
        if n < 1:
            raise ValueError(f"EPGroup.bundles={self.bundles!r} is invalid: a group has at least one rank.")
        for name in ("workers", "rank_pids", "node_ids"):
            got = len(getattr(self, name))
            if got not in (0, n):
                raise ValueError(f"EPGroup.{name} has {got} entries: it must have one per rank ({n}) or none.")

    @property
    def world_size(self) -> int:
        return len(self.bundles)

    def next(self, **changes) -> "EPGroup":
        """The group after a transition: these fields changed, the epoch one higher."""
        return replace(self, epoch=self.epoch + 1, **changes)

    def survivors(self, ranks: Sequence[int], config, plan, master_addr: str, master_port: int,
                  node_ids: Sequence[str] | None = None) -> "EPGroup":
        """The group of `ranks` (old rank numbers, in their new order) after a loss: each keeps its actor,
        process and bundle; `config` and `plan` are the survivors' own; node ids re-derived when given."""
        pick = lambda seq: tuple(seq[r] for r in ranks) if seq else ()  # noqa: E731
        return self.next(config=config, plan=plan, bundles=tuple(self.bundles[r] for r in ranks),
                         workers=pick(self.workers), rank_pids=pick(self.rank_pids),
                         node_ids=tuple(node_ids) if node_ids is not None else pick(self.node_ids),
                         master_addr=master_addr, master_port=master_port)


__all__ = ["EPGroup"]
