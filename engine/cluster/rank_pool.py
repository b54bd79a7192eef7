"""Rank processes kept for the next engine: a Ray executor that shuts down cleanly parks its rank actors (and their
placement group) here instead of killing them, and the next executor of as many ranks on the same Ray takes them and
re-initializes each for its own config (`Worker.reinit`) instead of starting new processes (issue 55).

Why: a rank process costs 1.5-1.7 s of CPU to start (importing torch and moelink), which is most of a small EP
engine's start; an engine started again in the same process (a notebook, a server restarted by its supervisor, a
test suite) pays it every time. What a parked rank keeps is its process and its imports: its model, KV cache,
process group, KV connector and threads are released when it parks (`Worker.park`), and its heap is unfrozen so
the old engine's objects are collected.

Off unless asked: `MOELINK_REUSE_RANK_PROCESSES=1` (or `RANK_POOL.enabled = True`), because a parked rank holds its
Ray resources (a placement group's CPU or GPU bundles) until it is taken, the pool is cleared (`clear`: a start of
another size clears it first, so the resources are there), it has waited PARKED_IDLE_S untaken, or Ray shuts down.
Only an executor that connected to a Ray it did not start itself parks (one that started its own Ray stops it at
shutdown), and only ranks that are provably idle: no loss recorded and not yet recovered (a survivor may still sit in a
collective with the lost rank), no failure, no step still out, the rejoiner stopped first (its spares are killed), and
each rank answers its `park` within PARK_TIMEOUT_S. `park` runs on the rank's step thread (the one a step or a
collective holds), so an answer proves that thread is free; a rank that does not answer (frozen, stuck in a
collective) is killed as before, never parked. An engine that lost ranks and recovered (elastic EP) parks its
survivors: each keeps its placement-group bundle, the lost ranks' bundles are free (their actors were killed), and
the next engine of the original size re-initializes the survivors and starts fresh ranks only in the free bundles. Entries are keyed by the Ray session (its GCS
address), the rank count and the device kind, so a new Ray never gets another's handles.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ENV = "MOELINK_REUSE_RANK_PROCESSES"
PARK_TIMEOUT_S = 10.0  # a rank that cannot release its engine within this is killed instead
# A parked engine not taken within this is cleared. An idle Ray worker process is not free: its task loop wakes
# every 10 ms to check for signals (~0.008 s of CPU a second, measured on the 2-core machines), so a parked process
# costs as much CPU as its fresh start (~2.5 s) after ~5 minutes, and it holds its bundle's CPU or GPU meanwhile.
PARKED_IDLE_S = 180.0


@dataclass
class Parked:
    """One engine's rank actors and the placement group their bundles are in: `workers[i]` is in bundle `bundles[i]`
    (None: every bundle, in order). After a loss only the survivors are here; the others' bundles are free."""

    session: str
    num_ranks: int
    gpu: bool
    pg: object
    workers: list
    cpus: int = 0  # the CPUs its bundles hold (what a caller counting free resources adds back)
    parked_at: float = field(default_factory=time.monotonic)
    bundles: tuple[int, ...] | None = None

    def by_bundle(self) -> dict[int, Any]:  # Ray actor handles (their remote methods are untyped)
        """{bundle: parked actor}; a bundle missing here is free (its rank was lost): the taker starts a fresh one."""
        bundles = self.bundles if self.bundles is not None else tuple(range(len(self.workers)))
        return dict(zip(bundles, self.workers))


@dataclass
class RankPool:
    """The parked engines of this process (module docstring)."""

    enabled: bool = field(default_factory=lambda: os.environ.get(ENV, "") not in ("", "0"))
    _parked: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    starts_saved: int = 0  # rank processes an engine start took from here instead of starting them
    starts_fresh: int = 0  # rank processes Ray executors of this process started (counted with the pool off too)
    idle_s: float = PARKED_IDLE_S  # how long a parked engine waits to be taken before it is cleared

    def put(self, parked: Parked) -> None:
        with self._lock:
            self._parked.append(parked)
        timer = threading.Timer(self.idle_s, self._expire)
        timer.daemon = True  # never keeps the interpreter alive: Ray's shutdown takes parked ranks anyway
        timer.start()

    def _expire(self) -> None:
        """Clear the parked engines that waited `idle_s` or more (a timer started at each `put`)."""
        now = time.monotonic()
        with self._lock:
            stale = [p for p in self._parked if now - p.parked_at >= self.idle_s]
            self._parked = [p for p in self._parked if now - p.parked_at < self.idle_s]
        for p in stale:
            _kill(p)

    def take(self, session: str, num_ranks: int, gpu: bool, free: int) -> Parked | None:
        """A parked engine of `num_ranks` ranks on this Ray session, or None. Without one, parked engines are
        cleared, oldest first, until `free` (the Ray's free bundles of this kind: CPUs, or GPUs) and theirs make
        room for a fresh start of `num_ranks`; another session's are always cleared (their Ray is gone)."""
        with self._lock:
            stale = [p for p in self._parked if p.session != session]
            live = [p for p in self._parked if p.session == session]
            match = next((p for p in live if (p.num_ranks, p.gpu) == (num_ranks, gpu)), None)
            if match is not None:
                live.remove(match)
                self.starts_saved += len(match.workers)
            else:
                while live and free < num_ranks:
                    oldest = live.pop(0)
                    stale.append(oldest)
                    free += oldest.num_ranks if oldest.gpu == gpu else 0
            self._parked = live
        for p in stale:
            _kill(p)
        return match

    def held_cpus(self) -> int:
        with self._lock:
            return sum(p.cpus for p in self._parked)

    def __len__(self) -> int:
        with self._lock:
            return len(self._parked)

    def clear(self) -> None:
        """Kill every parked rank and remove its placement group (their Ray resources back)."""
        with self._lock:
            parked, self._parked = self._parked, []
        for p in parked:
            _kill(p)


def _kill(p: Parked) -> None:
    try:
        import ray

        if not ray.is_initialized():
            return  # Ray went down with them
        for w in p.workers:
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone
                pass
        ray.util.remove_placement_group(p.pg)
    except Exception:
        logger.warning("could not release parked rank processes cleanly", exc_info=True)


def ray_session() -> str | None:
    """This process's Ray session (its GCS address), or None when not connected."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return None


RANK_POOL = RankPool()


# -- what a Ray executor asks (engine/cluster/ray_executor.py: its start and its shutdown) -------------------------
def _may_pool(state) -> bool:
    # Off, or a Ray the executor started itself (its shutdown stops that Ray) or connected to by address.
    return RANK_POOL.enabled and state.local is None and not state.connected


def take_parked(state, n: int, gpu: bool) -> Parked | None:
    """A parked engine's ranks for an executor's start of `n` ranks (its `_RayState`), or None: the pool off, a Ray
    the executor started itself, or none of this size parked (then the oldest parked make room if it needs it)."""
    if not _may_pool(state):
        return None
    session = ray_session()
    if session is None:
        return None
    import ray

    free = int(ray.available_resources().get("GPU" if gpu else "CPU", 0))
    return RANK_POOL.take(session, n, gpu, free)


def park(state, group, n: int, rejoiner=None) -> None:
    """Hand a cleanly shut down executor's ranks to the pool instead of killing them (module docstring): only on a
    Ray it did not start, with no loss pending and no failure; after a recovery, its survivors (each in its
    bundle of the start's `n`). `rejoiner` (engine/cluster/rejoin.py) is stopped first and its spares killed; one
    that does not stop in time parks nothing. A rank that does not answer its park within PARK_TIMEOUT_S stays in
    `state.workers`, which the executor's release kills. `group`: its EPGroup."""
    if not _may_pool(state):
        return
    with state.lock:
        healthy = state.dead_error is None and state.lost is None and not state.released
    session = ray_session()
    if not healthy or session is None:
        logger.debug("rank processes not parked: %s", "no Ray session" if healthy else "a loss or failure pending")
        return
    if rejoiner is not None and not rejoiner.stop(PARK_TIMEOUT_S):
        logger.warning("rank processes not parked: the rejoiner did not stop within %.0f s", PARK_TIMEOUT_S)
        return
    state.kill_spares()
    workers, bundles = list(state.workers), tuple(group.bundles)
    if not workers or len(workers) != len(bundles) or len(set(bundles)) != len(bundles) \
            or not all(0 <= b < n for b in bundles):
        logger.warning("rank processes not parked: ranks %d in bundles %s of %d", len(workers), bundles, n)
        return
    import ray

    refs = [w.park.remote() for w in workers]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PARK_TIMEOUT_S)
    answered = []
    for i, ref in enumerate(refs):
        try:
            if ref in ready:
                ray.get(ref, timeout=0)
                answered.append(i)
        except Exception as exc:  # its park raised: not provably idle
            logger.warning("rank in bundle %d not parked (%s): killed instead", bundles[i], exc)
    if len(answered) < len(workers):
        logger.warning("rank(s) in bundle(s) %s did not answer park within %.0f s: killed instead",
                       [bundles[i] for i in range(len(workers)) if i not in answered], PARK_TIMEOUT_S)
    if not answered:
        return
    with state.lock:
        pg, state.pg = state.pg, None
        state.workers = [w for i, w in enumerate(workers) if i not in answered]  # the release kills these
    RANK_POOL.put(Parked(session, n, group.config.device.type == "cuda", pg, [workers[i] for i in answered],
                         cpus=n, bundles=tuple(bundles[i] for i in answered)))

__all__ = ["ENV", "PARK_TIMEOUT_S", "Parked", "RANK_POOL", "RankPool", "park", "ray_session", "take_parked"]
