"""Rejoin: a replacement rank is admitted and the group returns to EP N (`--ep-rejoin`, on with elastic EP).

    a recovery (engine/cluster/elastic.py) frees the lost rank's placement-group bundle (Ray frees a killed actor's
    bundle; when a node dies, Ray re-places the group's bundles on a node that joins: one mechanism for both)
      ─▶ Rejoiner thread (never blocks a step): --ep-rejoin-delay-s after the loss, start a Worker actor in
         that bundle, wait for its heartbeat, have it pre-load its share of the original EP-N plan
         (Worker.preload); a start that fails (the actor dies, or does not answer in time) is logged and
         retried with backoff, at most Backoff.max_attempts times, then given up (EP N-1 stays)
      ─▶ every freed bundle has a live, pre-loaded replacement: `ready`
      ─▶ LLMEngine.step / check_health, at a step boundary: admit_engine
           admit_ranks: survivors and replacements, in bundle order, re-form at EP N with the original plan
           (elastic.reform_group: a pre-loaded replacement only builds its all-to-all there), then
           elastic.regroup_engine: every unfinished request is requeued and recomputed (as at a recovery),
           online EPLB restarts from the plan, the counters count the rejoin.
           If it fails midway (a replacement or a survivor dies, a step times out): the executor adopts the
           N ranks, records the loss and the recovery path runs at the ranks that are alive (serving goes
           on, no request is lost; a replacement that lives stays, a freed bundle gets a new one).

Stated: the survivors reload their share at the admission (their runners are rebuilt, KV caches too, and
every unfinished request is recomputed; keeping them, as a recovery does with engine/rank/keep_runner.py, would
need their slots shrunk back to the original placement: not done yet), so the admission's pause is about one
rebuilding recovery's; the placement is the original one (not an EPLB-balanced one:
EPLB starts over from it); replacements are admitted all at once, when every freed bundle has one.
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

from .elastic import _LOAD_TIMEOUT_S, _PROBE_TIMEOUT_S, _Unrecoverable, reform_group, regroup_engine
from .executor import WorkerDiedError
from .ray_runtime import _HEARTBEAT_GROUP, bundle_node_ids

logger = logging.getLogger(__name__)

_START_TIMEOUT_S = 120.0  # a replacement's actor answers its first heartbeat within this (its bundle is free)


@dataclass(frozen=True)
class Backoff:
    """Retries of a replacement that failed to start: the n-th failure waits first_s * factor**(n-1), at most
    max_s; after max_attempts failures the bundle is given up."""

    first_s: float = 2.0
    factor: float = 2.0
    max_s: float = 60.0
    max_attempts: int = 5

    def __post_init__(self) -> None:
        if not (self.first_s >= 0 and self.factor >= 1 and self.max_s >= self.first_s):
            raise ValueError(f"Backoff({self.first_s}, {self.factor}, {self.max_s}) is invalid: need first_s >= 0, "
                             "factor >= 1, max_s >= first_s.")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"Backoff.max_attempts={self.max_attempts!r} is invalid: must be an integer >= 1.")

    def delay(self, failures: int) -> float:
        return min(self.first_s * self.factor ** max(failures - 1, 0), self.max_s)


class Phase(str, enum.Enum):
    IDLE = "idle"  # no bundle is free: the group is whole
    WAITING = "waiting"  # a bundle is free; its replacement starts at its time (the delay, or a backoff)
    STARTING = "starting"  # a replacement is being started / pre-loading
    READY = "ready"  # every free bundle has a pre-loaded replacement: admit at the next step boundary
    GAVE_UP = "gave_up"  # a bundle failed max_attempts times: EP N-1 stays (until the next loss)


class RejoinTracker:
    """The replacements' state machine, one entry per freed bundle; pure Python (no Ray, no clock: `now` is
    passed in), driven by the Rejoiner thread and the admission."""

    def __init__(self, delay_s: float, backoff: Backoff):
        self.delay_s, self.backoff = delay_s, backoff
        self.not_before: dict[int, float] = {}  # every tracked (free) bundle -> its earliest next start
        self.failures: dict[int, int] = {}
        self.starting: set[int] = set()
        self.ready: dict[int, object] = {}  # bundle -> its replacement (an opaque handle)
        self.gave_up: set[int] = set()

    def lost(self, bundles, now: float) -> None:
        """Bundles freed by a recovery; a bundle given up before is tried again (a new loss: a new chance)."""
        for b in bundles:
            if b not in self.not_before or b in self.gave_up:
                self.not_before[b] = now + self.delay_s
                self.failures[b] = 0
                self.gave_up.discard(b)

    @property
    def phase(self) -> Phase:
        if not self.not_before:
            return Phase.IDLE
        if self.gave_up:
            return Phase.GAVE_UP
        if len(self.ready) == len(self.not_before):
            return Phase.READY
        return Phase.STARTING if self.starting else Phase.WAITING

    def due(self, now: float) -> list[int]:
        """The bundles whose replacement should start now (marked starting)."""
        busy = self.starting | set(self.ready) | self.gave_up
        out = sorted(b for b, t in self.not_before.items() if b not in busy and t <= now)
        self.starting.update(out)
        return out

    def next_time(self) -> float | None:
        busy = self.starting | set(self.ready) | self.gave_up
        times = [t for b, t in self.not_before.items() if b not in busy]
        return min(times) if times else None

    def succeeded(self, bundle: int, handle) -> None:
        self.starting.discard(bundle)
        if bundle in self.not_before:
            self.ready[bundle] = handle

    def failed(self, bundle: int, now: float) -> bool:
        """A start failed, or a ready replacement died: retry after the backoff (True), or give up (False)."""
        self.starting.discard(bundle)
        self.ready.pop(bundle, None)
        n = self.failures[bundle] = self.failures.get(bundle, 0) + 1
        if n >= self.backoff.max_attempts:
            self.gave_up.add(bundle)
            return False
        self.not_before[bundle] = now + self.backoff.delay(n)
        return True

    def take(self) -> dict[int, object]:
        """Every replacement, once all free bundles have one (READY); the tracker is then IDLE."""
        if self.phase is not Phase.READY:
            return {}
        out = dict(self.ready)
        self.not_before.clear()
        self.failures.clear()
        self.ready.clear()
        return out


class Rejoiner:
    """Starts replacements on a thread of its own. `start(bundle)` makes a Worker actor in that bundle (with the
    original plan and its rank = the bundle); `state` is the executor's _RayState (its `spares` hold the actors
    not yet admitted, which a release or a failure kills with the rest)."""

    # start(bundle) returns a Ray actor handle (its remote methods are attributes, untyped)
    def __init__(self, start: Callable[[int], Any], state, delay_s: float, backoff: Backoff = Backoff(),
                 start_timeout_s: float = _START_TIMEOUT_S, load_timeout_s: float = _LOAD_TIMEOUT_S):
        self._start_actor, self._state = start, state
        self.tracker = RejoinTracker(delay_s, backoff)
        self.start_timeout_s, self.load_timeout_s = start_timeout_s, load_timeout_s
        self.start_failures = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def lost(self, bundles) -> None:
        with self._lock:
            self.tracker.lost(bundles, time.monotonic())
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="moelink-rejoin", daemon=True)
                self._thread.start()
        self._wake.set()

    def stop(self, timeout_s: float) -> bool:
        """Stop starting replacements (the executor parks its ranks, engine/cluster/rank_pool.py): the thread ends
        at its next check, and one waiting on a replacement's answer ends when that spare is killed. True when no
        thread runs any more (so no spare can appear after the caller kills them)."""
        self._state.stopping.set()
        self._wake.set()
        self._state.kill_spares()  # a start waiting on its heartbeat or its preload fails now
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)
            return not thread.is_alive()
        return True

    @property
    def phase(self) -> Phase:
        return self.tracker.phase

    @property
    def ready(self) -> bool:
        return self.tracker.phase is Phase.READY

    def take(self) -> dict[int, tuple]:
        """The replacements {bundle: (actor, pid, pre-loaded)} when all are ready and still answer; {} otherwise (a dead
        one goes back to the backoff)."""
        import ray

        with self._lock:
            handles = dict(self.tracker.ready) if self.ready else {}
        if not handles:
            return {}
        refs = {b: h[0].heartbeat.options(concurrency_group=_HEARTBEAT_GROUP).remote() for b, h in handles.items()}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=_PROBE_TIMEOUT_S)
        dead = []
        for b, ref in refs.items():
            try:
                if ref not in ready:
                    raise TimeoutError("no heartbeat")
                ray.get(ref, timeout=0)
            except Exception as exc:
                dead.append(b)
                logger.warning("rejoin: the replacement for rank %d died before its admission (%s); starting "
                               "another", b, exc)
        with self._lock:
            for b in dead:
                self._discard(handles[b][0])
                self.tracker.failed(b, time.monotonic())
            if dead:
                self._wake.set()
                return {}
            return self.tracker.take()

    def admitted(self, actors) -> None:
        """The actors joined the group (or the executor adopted them): no longer spares."""
        spares = self._state.spares
        for a in actors:
            if a in spares:
                spares.remove(a)

    def _discard(self, actor) -> None:
        import ray

        self.admitted([actor])
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass

    def _run(self) -> None:
        state = self._state
        while not state.stopping.is_set() and state.dead_error is None:
            with self._lock:
                due = self.tracker.due(time.monotonic())
                nxt = self.tracker.next_time()
            for b in due:
                self._start_one(b)
            if due:
                continue
            wait = 1.0 if nxt is None else min(max(nxt - time.monotonic(), 0.0), 1.0)
            self._wake.wait(wait)
            self._wake.clear()

    def _start_one(self, bundle: int) -> None:
        import ray

        t0 = time.monotonic()
        actor = None
        try:
            actor = self._start_actor(bundle)
            self._state.spares.append(actor)
            pid = ray.get(actor.heartbeat.options(concurrency_group=_HEARTBEAT_GROUP).remote(),
                          timeout=self.start_timeout_s)
            preloaded = ray.get(actor.preload.remote(), timeout=self.load_timeout_s)
        except Exception as exc:
            self.start_failures += 1
            if actor is not None:
                self._discard(actor)
            with self._lock:
                retry = self.tracker.failed(bundle, time.monotonic())
            if retry:
                logger.warning("rejoin: the replacement for rank %d failed to start (%s); retrying in %.1f s",
                               bundle, exc, self.tracker.not_before[bundle] - time.monotonic())
            else:
                logger.error("rejoin: the replacement for rank %d failed to start %d times (last: %s); giving up, "
                             "serving on without it", bundle, self.tracker.backoff.max_attempts, exc)
            return
        with self._lock:
            self.tracker.succeeded(bundle, (actor, pid, preloaded))
        logger.warning("rejoin: replacement for rank %d ready (pid %d, %s) in %.2f s", bundle, pid,
                       "pre-loaded" if preloaded else "loads at admission", time.monotonic() - t0)


@dataclass(frozen=True)
class RejoinResult:
    admitted: tuple[int, ...]  # the new ranks that are replacements
    kept: tuple[int | None, ...]  # per new rank: the old rank it was, None for a replacement
    world_size: int
    num_kv_blocks: int | None
    seconds: float
    preloaded: tuple[bool, ...] = ()  # per admitted rank: its share was loaded before the admission


class RejoinFailed(RuntimeError):
    """An admission failed midway; the executor now holds all N ranks and a recorded loss (recover next)."""

    def __init__(self, kept: tuple, reason: str):
        super().__init__(reason)
        self.kept = kept


def admit_ranks(ex) -> RejoinResult | None:
    """Admit the ready replacements into `ex` (a RayExecutor): back to EP N with the original plan. None when
    none is ready (any more); raises RejoinFailed (the loss recorded for a recovery) when it fails midway."""
    from moelink.comm.two_level import node_numbers

    handles = ex.rejoiner.take()
    if not handles:
        return None
    t0 = time.monotonic()
    n = ex.full_plan.placement.ep_size
    kept, workers, pids = [], [], []
    for b in range(n):
        if b in ex.bundles:
            i = ex.bundles.index(b)
            kept.append(i)
            workers.append(ex.workers[i])
            pids.append(ex.rank_pids[i])
        else:
            actor, pid, _ = handles[b]
            kept.append(None)
            workers.append(actor)
            pids.append(pid)
    plan, config = ex.full_plan, ex.full_config
    try:
        node_ids = bundle_node_ids(ex.pg, n)  # a bundle may now sit on a node that joined
    except Exception:
        node_ids = list(ex.full_node_ids)
    if plan.backend.needs_node_map and config.parallel.node_of_rank() is None:
        plan = replace(plan, node_of_rank=node_numbers(node_ids))
    ex.rejoiner.admitted(h[0] for h in handles.values())
    try:
        addr, port, blocks, _ = reform_group(workers, plan, config)  # a rejoin rebuilds every runner
    except _Unrecoverable as exc:
        # The recovery path takes it from here, at the N ranks (whichever are alive): adopt them all, the
        # replacements to be dropped by it even if they answer.
        new = [b for b in range(n) if kept[b] is None]
        ex.adopt(ex.group.next(config=config, plan=plan, bundles=tuple(range(n)), workers=tuple(workers),
                               rank_pids=tuple(pids), node_ids=tuple(node_ids)), drop_on_recovery=tuple(new))
        ex.mark_lost(WorkerDiedError(new[0], f"admitting replacement rank(s) {new} failed: {exc}",
                                     "failed to rejoin", name=ex.rank_name(new[0])))
        logger.error("rejoin failed midway (%s); recovering at the ranks that are alive", exc)
        raise RejoinFailed(tuple(kept), str(exc)) from exc
    ex.commit(ex.group.next(config=config, plan=plan, bundles=tuple(range(n)), workers=tuple(workers),
                            rank_pids=tuple(pids), node_ids=tuple(node_ids), master_addr=addr, master_port=port))
    result = RejoinResult(tuple(sorted(handles)), tuple(kept), n, blocks, time.monotonic() - t0,
                          tuple(handles[b][2] for b in sorted(handles)))
    logger.warning("elastic EP: replacement rank(s) %s rejoined; back to EP %d after %.2f s", list(result.admitted),
                   n, result.seconds)
    return result


def admit_engine(engine) -> RejoinResult | None:
    """At a step boundary: admit the ready replacements, then requeue every unfinished request on the N ranks'
    schedulers (recomputed). On a failure midway, fall back to the recovery path (engine/cluster/elastic.py)."""
    from moelink.scheduler.scheduler import Scheduler

    from .elastic import recover_engine

    stats = engine.elastic_stats
    t0 = time.monotonic()
    try:
        result = engine.executor.admit()
    except RejoinFailed as exc:
        stats.failed_rejoins += 1
        # The engine's view follows the executor's N ranks (empty schedulers for the replacements), so that the
        # recovery's old-rank numbering is one.
        old = engine.schedulers
        engine.schedulers = [Scheduler(engine.config.scheduler, engine.config.cache) if k is None else old[k]
                             for k in exc.kept]
        engine.moe_metrics.regroup(list(exc.kept))
        engine.world_size = len(exc.kept)
        recover_engine(engine)
        return None
    if result is None:
        return None
    reqs = regroup_engine(engine, result.num_kv_blocks, list(result.kept))
    seconds = time.monotonic() - t0
    stats.rejoins += 1
    stats.rank_rejoins += len(result.admitted)
    stats.rejoin_seconds_total += seconds
    stats.last_rejoin_seconds = seconds
    stats.requests_requeued += len(reqs)
    stats.rejoin_history.append(replace(result, seconds=seconds))
    logger.warning("elastic EP: %d request(s) requeued at the rejoin; it took %.2f s", len(reqs), seconds)
    return result


__all__ = ["Backoff", "Phase", "RejoinFailed", "RejoinResult", "RejoinTracker", "Rejoiner", "admit_engine",
           "admit_ranks"]
