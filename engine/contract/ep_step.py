"""The driver's per-step expert-parallel plan: which dispatch mode a step runs, and how large its blocks are.

Only the driver sees every rank's SchedulerOutput, so the step's shape is read
there, once, and the same `EPStepPlan` rides to every rank with its output
(`SchedulerOutput.ep_step`). That is the once-per-step counts exchange of the
high-throughput mode: no MoE layer exchanges counts or syncs with the host to
size its buffers. Each rank's runner hands the plan to its all-to-all
(`AllToAll.begin_step`; comm/ep_modes.py picks the mode object from it).

The rule (`plan_ep_step`): a step in which every scheduled request on every
rank is a decode (one token) or a speculative verify (its last token and its
drafts: 1 + len(drafts) tokens), and no rank has more tokens than the decode
capacity, runs low-latency; every other step (a prompt chunk anywhere, or a
decode batch past the capacity) runs high-throughput with blocks of the step's
largest tokens-per-rank. A decode step past the capacity is never cut: it falls
back to high-throughput for that step.

With decode CUDA graphs under EP (direct NCCL, low-latency only), the plan also
carries the one graph size every rank replays in a pure-decode step
(`graph_batch`): the smallest captured size holding the largest decode batch
over ranks, so the ranks pad to the same size; None: the step runs eagerly. A
step with verify rows carries none: a rank whose every row verifies 1 + k
tokens replays its own verify graph (engine/rank/cuda_graph.py), the others
run eagerly. Mixing replays and eager passes is sound because a low-latency
dispatch moves R blocks of the decode capacity whatever a rank's T is (the
eager pass of a rank with no tokens already relies on it).
"""
from __future__ import annotations

from dataclasses import dataclass

from moelink.comm.ep_modes import HIGH_THROUGHPUT, LOW_LATENCY, MODES
from moelink.scheduler.outputs import SchedulerOutput


@dataclass(frozen=True)
class EPStepPlan:
    """One step's dispatch mode, its largest tokens-per-rank, and the decode graph size all ranks replay."""

    mode: str
    max_tokens_per_rank: int
    graph_batch: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"EPStepPlan.mode={self.mode!r} is invalid: choose from {', '.join(MODES)}.")
        n = self.max_tokens_per_rank
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"EPStepPlan.max_tokens_per_rank={n!r} is invalid: must be an integer >= 0.")
        if self.graph_batch is not None and (self.mode != LOW_LATENCY or self.graph_batch < max(1, n)):
            raise ValueError(f"EPStepPlan.graph_batch={self.graph_batch!r} is invalid: graphs replay low-latency "
                             f"steps only, at a size >= the step's {n} tokens per rank.")


def is_decode_only(so: SchedulerOutput) -> bool:
    """Every scheduled request has one token (an empty rank counts as decode: it adds no tokens)."""
    return all(n == 1 for n in so.num_scheduled_tokens.values())


def is_decode_or_verify(so: SchedulerOutput) -> bool:
    """Every scheduled request decodes one token or verifies its drafts (1 + len(drafts) tokens)."""
    spec = so.scheduled_spec_tokens
    return all(n == 1 + len(spec.get(r, ())) for r, n in so.num_scheduled_tokens.items())


def plan_ep_step(outputs_per_rank: list[SchedulerOutput], decode_capacity: int,
                 graph_sizes: tuple[int, ...] = ()) -> EPStepPlan:
    """The plan of one step from every rank's SchedulerOutput (the rule is in the module docstring).

    graph_sizes: the decode batch sizes every rank captured (sorted; empty: no graphs under EP).
    """
    max_tokens = max((so.total_num_scheduled_tokens for so in outputs_per_rank), default=0)
    if max_tokens <= decode_capacity and all(is_decode_or_verify(so) for so in outputs_per_rank):
        graph = None
        if max_tokens and all(is_decode_only(so) for so in outputs_per_rank):
            graph = next((b for b in graph_sizes if b >= max_tokens), None)
        return EPStepPlan(LOW_LATENCY, max_tokens, graph)
    return EPStepPlan(HIGH_THROUGHPUT, max_tokens)


def attach_ep_step(outputs_per_rank: list[SchedulerOutput], decode_capacity: int | None,
                   graph_sizes: tuple[int, ...] = ()) -> EPStepPlan | None:
    """Plan the step and set `ep_step` on every rank's output (None: the backend sizes each call itself)."""
    if decode_capacity is None:
        return None
    plan = plan_ep_step(outputs_per_rank, decode_capacity, graph_sizes)
    for so in outputs_per_rank:
        so.ep_step = plan
    return plan


__all__ = ["EPStepPlan", "HIGH_THROUGHPUT", "LOW_LATENCY", "attach_ep_step", "is_decode_only",
           "is_decode_or_verify", "plan_ep_step"]
