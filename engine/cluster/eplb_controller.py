"""Online EPLB on the driver: watch the live expert load, re-place experts every `interval` steps, move weights.

Legend: L MoE layers, G logical experts, R ranks.

After every engine step the driver adds the step's expert-load counts (all
ranks summed, [L, G], already read once per step by moe/stats.py) to a sliding
window of the last `interval` steps. Every `interval` steps it runs EPLB
(moe/eplb.py) on the window; when the new placement differs, the ranks start
a move (moe/expert_move.py): one chunk of up to `chunk_layers` MoE layers per
step boundary, so no gap between steps stalls for long; every rank switches a
chunk's layers (weights and tables together) at the end of that chunk, before
the next step. A placement that would lower the predicted max/mean by less than
`min_gain` is not worth moving weights for.

Staging bound: a chunk stages the slots each rank receives (or copies locally)
until it switches, so a rank holds at most one chunk's incoming experts on top
of its weights. `staging_bytes` (--eplb-staging-mb) caps that per rank;
default: the largest expert slot's bytes x the most slots a rank holds x
chunk_layers (a chunk can never need more). The chunks are cut from the plan
on the driver (layers stay whole; fewer layers per chunk where a chunk would
stage more); a plan with a single layer over the budget is refused (logged,
counted in `plans_refused`), the current placement serving on.

Metrics (`snapshot`): rebalances, expert bytes moved, bytes staged (total, the
peak one rank held, the budget), refused plans, the predicted max/mean rank
load before/after the last rebalance, the measured max/mean over the window
under the current placement, and the longest inter-step move chunk.

A rank lost during a chunk (engine/cluster/elastic.py): the collective raises
WorkerDiedError out of `after_step`; the engine recovers and builds a new
controller for the survivors (their layers are rebuilt from the checkpoint).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import numpy as np

from moelink.moe.eplb import EPLBResult, LoadWindow, imbalance, rank_load, rebalance_experts
from moelink.moe.expert_move import chunk_staging_bytes, plan_moves
from moelink.moe.placement import ExpertPlacement

from ..contract.worker_api import RankCall

logger = logging.getLogger(__name__)

# Runs a Worker call (a RankCall, engine/contract/worker_api.py) on every rank together; results in rank order
# (Executor.collective).
Collective = Callable[..., list]


class EPLBController:
    def __init__(self, interval: int, placement: ExpertPlacement, num_layers: int, *, num_groups: int = 1,
                 node_of_rank: Sequence[int] | None = None, chunk_layers: int = 1, min_gain: float = 0.05,
                 staging_bytes: int | None = None):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"EPLBController.interval must be an integer >= 1 (steps), got {interval!r}.")
        if isinstance(chunk_layers, bool) or not isinstance(chunk_layers, int) or chunk_layers < 1:
            raise ValueError(f"EPLBController.chunk_layers must be an integer >= 1, got {chunk_layers!r}.")
        if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not min_gain >= 0:
            raise ValueError(f"EPLBController.min_gain must be a number >= 0, got {min_gain!r}.")
        if staging_bytes is not None and (isinstance(staging_bytes, bool) or not isinstance(staging_bytes, int)
                                          or staging_bytes < 1):
            raise ValueError(f"EPLBController.staging_bytes must be None or an integer >= 1, got {staging_bytes!r}.")
        self.staging_bytes = staging_bytes  # None: the default (module docstring), once the slot sizes are known
        self.slot_bytes_L: list[int] | None = None  # the ranks' (set_slot_bytes): at start-up, or the first move
        # A new placement moves weights only when it lowers the predicted max/mean by at least min_gain: a
        # window's noise alone should not keep the ranks shuffling experts.
        self.interval, self.chunk_layers, self.min_gain = interval, chunk_layers, min_gain
        self.num_groups, self.node_of_rank = num_groups, node_of_rank
        self.placements: tuple[ExpertPlacement, ...] = (placement,) * num_layers
        self.window = LoadWindow(interval, num_layers, placement.num_experts)
        self.steps = 0
        self._due = False  # a rebalance is due at the next boundary where nothing is in flight (record/act)
        self.pending: EPLBResult | None = None  # a move under way
        self._chunks: list[int] = []  # the layers of each chunk still to move
        self._old: tuple[ExpertPlacement, ...] = ()
        self._moved = 0  # layers already switched in the move under way
        self.chunk_in_flight = False  # an eplb_move collective is running (a kill lands mid-move)
        self.plans_refused = 0
        self.bytes_staged = 0  # every chunk's staged bytes, all ranks
        self.peak_staged_bytes = 0  # the most one rank staged in one chunk (measured by the ranks)
        self.rebalances = 0
        self.bytes_moved = 0
        self.last: EPLBResult | None = None
        self.move_chunk_s: list[float] = []  # every move chunk's time (a gap between two steps)
        self.commit_s = 0.0
        # Measured: (token, expert) pairs each rank's experts computed, [L, R]: over the window, and since the
        # last commit (the new placement's own load).
        self.pairs_window = LoadWindow(interval, num_layers, placement.ep_size)
        self.pairs_since_commit_LR = np.zeros((num_layers, placement.ep_size), dtype=np.int64)
        self.measured_before: float | None = None
        # One record per rebalance (step, bytes, predicted and measured max/mean before/after); the last one's
        # measured_imbalance_after is live until the next rebalance.
        self.history: list[dict] = []

    @property
    def moving(self) -> bool:
        return self.pending is not None

    def after_step(self, counts_LG, collective: Collective, pairs_LR=None) -> None:
        """Count one step's expert load (and, when given, the pairs each rank computed [L, R]); start, continue
        or finish a move. At a step boundary, on the driver."""
        self.record(counts_LG, pairs_LR)
        self.act(collective)

    def record(self, counts_LG, pairs_LR=None) -> None:
        """Count one step's expert load; no collective (the overlapped loop counts while a step is in flight)."""
        self.window.add(counts_LG)
        if pairs_LR is not None:
            self.pairs_window.add(pairs_LR)
            self.pairs_since_commit_LR += np.asarray(pairs_LR, dtype=np.int64)
        self.steps += 1
        if self.steps % self.interval == 0:
            self._due = True

    def wants_to_act(self) -> bool:
        """A move is under way or a rebalance is due: `act` needs every rank between steps (the overlapped loop
        drains the step in flight first)."""
        return self.pending is not None or self._due

    def act(self, collective: Collective) -> None:
        """Start, continue or finish a move (the ranks must be between steps, nothing in flight)."""
        due, self._due = self._due, False
        if self.pending is not None:
            self._continue(collective)
        elif due and self.window.total_LG.sum() > 0:
            result = rebalance_experts(self.window.total_LG, self.placements, num_groups=self.num_groups,
                                       node_of_rank=self.node_of_rank)
            if (_layouts(result.placements) != _layouts(self.placements)
                    and result.imbalance_before - result.imbalance_after >= self.min_gain):
                chunks = self._plan_chunks(result.placements, collective)
                if chunks is None:
                    return
                collective(RankCall.EPLB_BEGIN, list(result.placements))
                self.pending, self._chunks, self._old, self._moved = result, chunks, self.placements, 0
                self._continue(collective)

    def set_slot_bytes(self, slot_bytes_L: Sequence[int]) -> None:
        """The bytes of one expert slot of each MoE layer (the ranks', at start-up). A staging budget below the
        largest could never move that layer's experts: refused here, naming the flag."""
        self.slot_bytes_L = [int(b) for b in slot_bytes_L]
        if self.staging_bytes is not None and self.staging_bytes < max(self.slot_bytes_L):
            raise ValueError(f"--eplb-staging-mb allows {self.staging_bytes} bytes per rank, below one expert slot of "
                             f"this model ({max(self.slot_bytes_L)} bytes, every tensor of an expert): online "
                             "EPLB could never move it; raise --eplb-staging-mb or leave it unset (the default fits "
                             "a chunk).")

    def staging_budget(self) -> int | None:
        """Bytes one rank may stage in a chunk (None until the ranks reported their slot sizes)."""
        if self.staging_bytes is not None or self.slot_bytes_L is None:
            return self.staging_bytes
        slots = max(max(p.slots_per_rank) for p in self.placements)
        return max(self.slot_bytes_L) * slots * self.chunk_layers

    def _plan_chunks(self, new: Sequence[ExpertPlacement], collective: Collective) -> list[int] | None:
        """The layers of each chunk: up to chunk_layers whole layers, each chunk within the staging budget on
        every rank; None (refused, logged) when one layer alone stages more than the budget on some rank."""
        if self.slot_bytes_L is None:  # a controller built after a recovery: ask the ranks (the same on each)
            self.set_slot_bytes(collective(RankCall.EPLB_SLOT_BYTES)[0])
        budget = self.staging_budget()
        transfers = plan_moves(self.placements, new)
        R, L = new[0].ep_size, len(new)
        chunks, first = [], 0
        while first < L:
            size = 0
            for n in range(1, min(self.chunk_layers, L - first) + 1):
                if max(chunk_staging_bytes(transfers, self.slot_bytes_L, first, first + n, R)) > budget:
                    break
                size = n
            if size == 0:
                need = chunk_staging_bytes(transfers, self.slot_bytes_L, first, first + 1, R)
                rank = int(np.argmax(need))
                self.plans_refused += 1
                logger.warning("online EPLB: plan refused: MoE layer %d would stage %d bytes on rank %d, over the "
                               "staging budget of %d bytes per rank (--eplb-staging-mb); the current placement "
                               "serves on. Raise --eplb-staging-mb to allow it.", first, need[rank], rank, budget)
                return None
            chunks.append(size)
            first += size
        self.bytes_staged += sum(chunk_staging_bytes(transfers, self.slot_bytes_L, 0, L, R))  # applied plans only
        return chunks

    def _continue(self, collective: Collective) -> None:
        n = self._chunks.pop(0)
        t0 = time.perf_counter()
        self.chunk_in_flight = True
        try:
            done = all(collective(RankCall.EPLB_MOVE, n))
        finally:
            self.chunk_in_flight = False
        self.move_chunk_s.append(time.perf_counter() - t0)
        # Those layers switched on every rank (moe/expert_move.py): they serve on their new placement now.
        self._moved += n
        self.placements = tuple(self.pending.placements[: self._moved]) + tuple(self._old[self._moved:])
        if done != (not self._chunks):
            raise RuntimeError(f"online EPLB: the ranks report the move {'done' if done else 'not done'} after "
                               f"{self._moved} layers, the driver's chunks disagree")
        if done:
            t0 = time.perf_counter()
            ends = collective(RankCall.EPLB_COMMIT)
            self.bytes_moved += sum(int(sent) for sent, _ in ends)
            self.peak_staged_bytes = max(self.peak_staged_bytes, max(int(peak) for _, peak in ends))
            self.commit_s = max(self.commit_s, time.perf_counter() - t0)
            if self.history:  # the previous placement's measured load ends here
                self.history[-1]["measured_imbalance_after"] = self._measured_after()
            bytes_now = self.bytes_moved - sum(h["bytes_moved"] for h in self.history)
            self.placements, self.last, self.pending = self.pending.placements, self.pending, None
            self.measured_before = _mean_imbalance(self.pairs_window.total_LG)
            self.pairs_since_commit_LR[:] = 0
            self.history.append(dict(step=self.steps, bytes_moved=bytes_now,
                                     predicted_imbalance_before=self.last.imbalance_before,
                                     predicted_imbalance_after=self.last.imbalance_after,
                                     measured_imbalance_before=self.measured_before, measured_imbalance_after=None))
            self.rebalances += 1

    def _measured_after(self) -> float | None:
        return _mean_imbalance(self.pairs_since_commit_LR) if self.pairs_since_commit_LR.sum() else None

    def measured_imbalance(self, load_LG=None) -> float:
        """max/mean rank load under the current placements for load_LG (default: the window), layers averaged."""
        load_LG = self.window.total_LG if load_LG is None else np.asarray(load_LG)
        return float(np.mean([imbalance(rank_load(p, row)) for p, row in zip(self.placements, load_LG)]))

    def experts_on_ranks_per_layer(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """[L][R]: the logical expert of each slot of each rank, under the current placement."""
        return tuple(tuple(tuple(p.experts_on_rank(r)) for r in range(p.ep_size)) for p in self.placements)

    def snapshot(self) -> dict:
        return dict(rebalances=self.rebalances, bytes_moved=self.bytes_moved, moving=self.moving,
                    bytes_staged=self.bytes_staged, peak_staged_bytes=self.peak_staged_bytes,
                    staging_budget_bytes=self.staging_budget(), plans_refused=self.plans_refused,
                    predicted_imbalance_before=self.last.imbalance_before if self.last else None,
                    predicted_imbalance_after=self.last.imbalance_after if self.last else None,
                    window_imbalance=self.measured_imbalance(),
                    measured_imbalance_before=self.measured_before,
                    measured_imbalance_after=self._measured_after() if self.rebalances else None,
                    history=[dict(h) for h in self.history[:-1]] + ([dict(self.history[-1], measured_imbalance_after=
                                                                           self._measured_after())]
                                                                     if self.history else []),
                    longest_move_chunk_s=max(self.move_chunk_s, default=0.0), commit_s=self.commit_s)


def _mean_imbalance(load_LR) -> float:
    return float(np.mean([imbalance(row) for row in np.asarray(load_LR, dtype=np.float64)]))


def make_eplb_controller(config, plan) -> EPLBController | None:
    """The engine's controller from its config (`parallel.eplb_interval`; None when 0) and EP plan."""
    interval = config.parallel.eplb_interval
    if not interval:
        return None
    # The router's expert groups (DeepSeek's n_group): EPLB keeps a group on one node when groups divide nodes.
    moe = config.model.moe
    groups = moe.router.n_group if moe is not None else 1
    mb = config.parallel.eplb_staging_mb
    return EPLBController(interval, plan.placement, len(config.model.sparse_layers), num_groups=groups,
                          node_of_rank=plan.node_of_rank, staging_bytes=None if mb is None else int(mb * 2**20))


def step_expert_load(runner_outs, metrics) -> tuple[np.ndarray, np.ndarray]:
    """One step's expert load [L, G], all ranks summed, and the pairs each rank computed [L, R], from what the
    ranks reported (zeros where a rank ran nothing)."""
    total = np.zeros((metrics.num_moe_layers, metrics.num_experts), dtype=np.int64)
    pairs = np.zeros((metrics.num_moe_layers, len(runner_outs)), dtype=np.int64)
    for r, ro in enumerate(runner_outs):
        if ro.stats is not None and ro.stats.moe is not None:
            total += ro.stats.moe.tokens_per_expert
            if ro.stats.moe.pairs_computed_per_layer:
                pairs[:, r] = ro.stats.moe.pairs_computed_per_layer
    return total, pairs


def _layouts(placements) -> list:
    return [[p.experts_on_rank(r) for r in range(p.ep_size)] for p in placements]


__all__ = ["EPLBController", "make_eplb_controller", "step_expert_load"]
