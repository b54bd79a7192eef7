"""Elastic expert parallelism: lose a rank, keep serving at EP N-1 (`--elastic-ep`); under tensor parallelism a
loss takes the rank's whole TP group out and the other groups serve on (EP N-tp, runners rebuilt).

    rank lost ─▶ RayExecutor records it (state.lost; the survivors are NOT killed)
              ─▶ LLMEngine.step / check_health ─▶ recover_engine
                   1. recover_ranks (driver): find every dead rank (the lost one, plus any that does not
                      answer a heartbeat), kill them, wait until each survivor's failed step has ended,
                      re-place for the survivors (`survivor_placement`: each keeps its experts; an expert
                      only lost ranks held goes to the survivor with the fewest, unless a replica of it
                      survives), form the new group without the dead ranks:
                      - kept (the default): each survivor keeps its model runner (engine/rank/keep_runner.py):
                        its dense weights, the experts it held, its KV cache and its request states stay;
                        only the experts newly placed on it are read from the checkpoint, into slots
                        appended to its MoE layers, whose tables and all-to-all switch to the new group;
                      - rebuilt (the fallback, when any survivor cannot keep its runner: a layer online EPLB
                        re-placed, the new slots not fitting beside the old ones; logged once): each
                        survivor drops its runner (Worker.reconfigure), loads its whole new share from the
                        checkpoint, and the KV cache is sized and allocated again;
                      then restart the heartbeats;
                   2. requeue: the requests that lived on the lost rank(s) (their KV is gone with it) go to the
                      least-loaded survivors with their prompt and the tokens already streamed, recomputed like
                      a preempted request: their clients see a pause, not an error. With kept runners the
                      survivors keep their schedulers and requests as they are (mid-prefill, mid-decode): only
                      the step the loss broke is undone (Scheduler.rewind) and recomputed, and each worker's
                      request states are re-sent with the next step. With rebuilt runners every unfinished
                      request is requeued.

The re-form steps (`reform_group`, the executor's `commit` of the next `EPGroup`, `regroup_engine`) are shared with the rejoin of a replacement
rank (engine/cluster/rejoin.py), which returns the group to EP N.

Stated: seeded sampling of a requeued request restarts its generator (greedy outputs are unchanged), and a
kept survivor's seeded request may have drawn once in the broken step; a rejoin (engine/cluster/rejoin.py) still
rebuilds every runner and requeues every request.
Recovery is impossible, and the old fail-fast path is taken (one WorkerDiedError naming the rank and why),
when fewer than 2 ranks survive, a survivor stays inside the failed step (a collective that waits for the
lost rank until comm_timeout_s), the placement cannot be built at EP N-1, or a survivor cannot load its
share (its memory budget).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

from moelink.moe.placement import ExpertPlacement

from .executor import WorkerDiedError
from ..contract.expert_parallel import plan_expert_parallel
from ..config.kv_sizing import common_num_kv_blocks

logger = logging.getLogger(__name__)

_PROBE_TIMEOUT_S = 5.0  # a survivor answers a heartbeat within this (its own thread), or counts as lost
_LOAD_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class SurvivorPlacement(ExpertPlacement):
    """A placement given slot by slot: each survivor keeps the experts it held, in its local slot order, and
    the experts only lost ranks held are appended to the survivors (`survivor_placement`). A subclass here, so
    that moe/placement.py (whose tables EPLB owns) is untouched: only `_build_slots` differs."""

    given_slots: tuple[tuple[int, ...], ...] = ()

    def _build_slots(self, replicas):
        slots = tuple(tuple(s) for s in self.given_slots)
        if len(slots) != self.ep_size:
            raise ValueError(f"SurvivorPlacement.given_slots has {len(slots)} ranks, ep_size={self.ep_size}.")
        for r, held in enumerate(slots):
            if not held or len(set(held)) != len(held) or not all(0 <= e < self.num_experts for e in held):
                raise ValueError(f"SurvivorPlacement: rank {r} holds {held}: every rank needs at least one "
                                 f"expert, each in [0, {self.num_experts}) at most once.")
        copies = [0] * self.num_experts
        for held in slots:
            for e in held:
                copies[e] += 1
        if 0 in copies:
            raise ValueError(f"SurvivorPlacement: expert {copies.index(0)} is held by no rank.")
        extra = tuple(e for e in range(self.num_experts) for _ in range(copies[e] - 1))
        return slots, extra


def survivor_placement(old: ExpertPlacement, survivors: list[int]) -> SurvivorPlacement:
    """The placement at EP len(survivors) that moves the least: every survivor keeps its experts, in its local
    slot order (a survivor that keeps its runner keeps their weights in memory, engine/rank/keep_runner.py); an
    expert a lost rank held is served by its replicas on survivors when it has any (replicas first), and
    otherwise appended to the survivor with the fewest slots (lowest rank on ties), which loads it from the
    checkpoint."""
    slots = [list(old.experts_on_rank(r)) for r in survivors]
    held = {e for s in slots for e in s}
    for e in range(old.num_experts):
        if e not in held:
            min(slots, key=lambda s: (len(s), slots.index(s))).append(e)
    return SurvivorPlacement(num_experts=old.num_experts, ep_size=len(slots),
                             given_slots=tuple(tuple(s) for s in slots))


@dataclass(frozen=True)
class RecoveryResult:
    dead_ranks: tuple[int, ...]  # in the old numbering
    survivors: tuple[int, ...]  # old rank of each new rank
    world_size: int
    num_kv_blocks: int | None  # per rank, when the ranks sized their caches; None: the configured count (or kept)
    seconds: float
    kept_runners: bool = False  # the survivors kept their runners, KV caches and requests (engine/rank/keep_runner.py)


@dataclass
class ElasticStats:
    """Counters of elastic EP (exported with the engine's metrics)."""

    rank_losses: int = 0
    recoveries: int = 0
    failed_recoveries: int = 0
    recovery_seconds_total: float = 0.0
    last_recovery_seconds: float | None = None
    requests_requeued: int = 0  # requests requeued, recomputed from their tokens (recoveries and rejoins)
    requests_on_lost_ranks: int = 0  # the unfinished requests that lived on a lost rank (always requeued)
    recoveries_keeping_runners: int = 0  # recoveries whose survivors kept their runners: only lost ranks' requeued
    history: list[RecoveryResult] = field(default_factory=list)
    # Rejoin (engine/cluster/rejoin.py): replacement ranks admitted, admissions, their time (the step paused), admissions
    # that failed midway (the engine fell back to a recovery). Replacements that failed to start (retried) are
    # counted by the executor's Rejoiner (`start_failures`).
    rank_rejoins: int = 0
    rejoins: int = 0
    failed_rejoins: int = 0
    rejoin_seconds_total: float = 0.0
    last_rejoin_seconds: float | None = None
    rejoin_history: list = field(default_factory=list)  # rejoin.RejoinResult of each admission


class _Unrecoverable(RuntimeError):
    pass


def _gather(refs, timeout: float, what: str) -> list:
    import ray

    ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
    if pending:
        raise _Unrecoverable(f"{len(pending)} surviving rank(s) did not finish {what} within {timeout:g} s")
    try:
        return ray.get(list(refs))
    except Exception as exc:
        raise _Unrecoverable(f"a surviving rank failed {what}: {exc}") from exc


def lost_tp_groups(dead: set[int], tp: int) -> set[int]:
    """Every rank of each TP group (tp consecutive ranks) that lost one: {3}, tp=2 -> {2, 3}."""
    return {g * tp + i for g in {r // tp for r in dead} for i in range(tp)}


def _find_dead(ex) -> set[int]:
    """The ranks whose actor is gone or silent (a live rank answers on its heartbeat thread, also mid-step).
    Not simply the rank that reported the loss: a survivor's collective may fail (connection reset by the
    dead peer) before Ray reports the dead actor."""
    import ray

    refs = ex.heartbeat_refs()
    timeout = min(ex.config.parallel.heartbeat_timeout_s, _PROBE_TIMEOUT_S)
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
    dead = set()
    for r, ref in enumerate(refs):
        if ref not in ready:
            dead.add(r)
            continue
        try:
            ray.get(ref, timeout=0)
        except Exception:
            dead.add(r)
    return dead


def _survivor_config(config, survivors: list[int], num_redundant: int):
    par = config.parallel
    node_ids = None if par.ep_node_ids is None else tuple(par.ep_node_ids[r] for r in survivors)
    return replace(config, parallel=replace(par, expert_parallel_size=len(survivors), ep_node_ids=node_ids,
                                            num_redundant_experts=num_redundant))


def _keep_runners(workers: list, plan) -> bool:
    """Every survivor keeps its model runner (Worker.reconfigure_keep), or none does: one that cannot (the
    first reason is logged, once) and all rebuild theirs. True when they all keep."""
    m = len(workers)
    why = [w for w in _gather([w.reconfigure_keep.remote(i, m, plan) for i, w in enumerate(workers)],
                              _LOAD_TIMEOUT_S, "leaving the old group") if w is not None]
    if why:
        logger.warning("elastic EP: the survivors rebuild their model runners and recompute every request, as "
                       "%d of them cannot keep theirs (%s)", len(why), why[0])
    return not why


def reform_group(workers: list, plan, config, keep: bool = False) -> tuple[str, int, int | None, bool]:
    """Form a new group of `workers` (actors, in their new rank order) running `plan`: each leaves its old group
    and, with `keep` (a recovery), keeps its model runner when every one can (engine/rank/keep_runner.py: only the
    experts newly placed on it are loaded, its KV cache and requests stay), else drops it (Worker.reconfigure);
    rank 0 picks a rendezvous, all join it, load their share of the experts (or grow theirs), and size and
    allocate their KV caches when the size is not configured and the runners were rebuilt. Shared by a recovery
    (EP N-1) and a rejoin (EP N, always rebuilt). Returns (address, port, KV blocks per rank or None, whether
    the runners were kept); raises _Unrecoverable naming the step."""
    m = len(workers)
    kept = keep and _keep_runners(workers, plan)
    if not kept:
        _gather([w.reconfigure.remote(i, m, plan) for i, w in enumerate(workers)], _LOAD_TIMEOUT_S,
                "leaving the old group")
    addr, port = _gather([workers[0].pick_master.remote()], _LOAD_TIMEOUT_S, "choosing a rendezvous")[0]
    _gather([w.init_distributed.remote(addr, port) for w in workers], _LOAD_TIMEOUT_S, "forming the new group")
    _gather([w.load.remote() for w in workers], _LOAD_TIMEOUT_S, "loading its share of the experts")
    blocks = None
    if config.cache.num_kv_blocks is None and not kept:
        blocks = common_num_kv_blocks(_gather([w.available_kv_blocks.remote() for w in workers],
                                              _LOAD_TIMEOUT_S, "sizing its KV cache"))
        _gather([w.allocate_kv_cache.remote(blocks) for w in workers], _LOAD_TIMEOUT_S, "allocating its KV cache")
    return addr, port, blocks, kept


def recover_ranks(ex, drop_if_all_alive: tuple[int, ...] = (), keep: bool = True) -> RecoveryResult:
    """Re-form `ex` (a RayExecutor with `lost_error` set) from its survivors at EP N-1; see the module doc.
    `drop_if_all_alive`: the ranks to drop when every rank still answers (a rejoin that failed). `keep`: the
    survivors may keep their runners (False: they rebuild, e.g. after a failed rejoin that may have rebuilt
    them already). Raises the loss (WorkerDiedError, now the executor's dead_error, every rank stopped) when
    it cannot."""
    import ray

    from moelink.comm.two_level import node_numbers

    lost = ex.lost_error
    if lost is None:
        raise RuntimeError("recover_ranks: no rank is lost")
    t0 = time.monotonic()
    old_workers = list(ex.workers)
    try:
        dead = _find_dead(ex) or set(drop_if_all_alive)  # a failed rejoin whose ranks all live: drop its new ones
        if not dead:  # every rank is alive: the step failed on its own (a bug, not a loss); no rank to drop
            raise _Unrecoverable("every rank still answers, so no rank was lost: the step itself failed")
        tp = ex.config.parallel.tensor_parallel_size
        if tp > 1:
            # A TP group cannot go on without one of its ranks (each holds a share of every attention layer):
            # the whole group goes, and the survivors are whole groups, in order, so consecutive new ranks form
            # the same groups. Their runners are rebuilt: the layers hold the old TP sub-groups.
            dead = lost_tp_groups(dead, tp)
            keep = False
        survivors = [r for r in range(len(old_workers)) if r not in dead]
        for r in dead:
            try:
                ray.kill(old_workers[r], no_restart=True)
            except Exception:  # already gone
                pass
        if tp > 1 and not survivors:
            raise _Unrecoverable(f"no whole TP group of {tp} ranks would survive")
        if len(survivors) < 2:
            raise _Unrecoverable(f"{len(survivors)} rank(s) would survive; elastic EP needs at least 2")
        # A survivor's step ends once its collective with the lost rank fails; the ping queues behind it.
        wait = ex.config.parallel.comm_timeout_s + _PROBE_TIMEOUT_S
        _gather([old_workers[r].ping.remote() for r in survivors], wait, "the step the lost rank broke")
        placement = survivor_placement(ex.plan.placement, survivors)
        config = _survivor_config(ex.config, survivors, placement.num_redundant)
        try:
            plan = replace(plan_expert_parallel(config), placement=placement)
        except ValueError as exc:
            raise _Unrecoverable(f"the {len(survivors)} surviving ranks cannot run the experts: {exc}") from exc
        node_ids = [ex.node_ids[r] for r in survivors] if ex.node_ids else []
        if plan.backend.needs_node_map and plan.node_of_rank is None and node_ids:
            plan = replace(plan, node_of_rank=node_numbers(node_ids))
        workers = [old_workers[r] for r in survivors]
        addr, port, blocks, kept = reform_group(workers, plan, config, keep=keep)
    except _Unrecoverable as exc:
        err = WorkerDiedError(lost.rank, f"{lost.reason}; elastic EP cannot go on without it: {exc}", lost.what,
                              name=lost.name)
        raise ex.give_up(err) from exc
    m = len(workers)
    ex.commit(ex.group.survivors(survivors, config, plan, addr, port, node_ids))
    result = RecoveryResult(tuple(sorted(dead)), tuple(survivors), m, blocks, time.monotonic() - t0, kept)
    logger.warning("elastic EP: lost rank(s) %s; serving on at EP %d (old ranks %s, runners %s) after %.2f s",
                   list(result.dead_ranks), m, survivors, "kept" if kept else "rebuilt", result.seconds)
    return result


def regroup_engine(engine, num_kv_blocks: int | None, kept: list, keep_runners: bool = False) -> list:
    """The engine's side of a new group (a recovery or a rejoin; the executor has re-formed it): config, one
    scheduler per new rank, the requests to requeue requeued (recomputed from their prompt and the tokens
    already streamed, like a preempted request, on the least-loaded ranks), online EPLB restarted from the new
    plan, the per-rank metrics re-indexed. `kept[i]`: the old rank new rank i was (None: a replacement).
    `keep_runners` (the survivors kept their runners): each survivor keeps its scheduler and its requests as
    they are, the step the loss broke undone (Scheduler.rewind), and only the lost ranks' requests are
    requeued; otherwise every unfinished request is. Returns the requeued requests."""
    from moelink.scheduler.router import LeastLoadedRouter
    from moelink.scheduler.scheduler import Scheduler

    world_size = len(kept)
    cfg = engine.config
    cache = cfg.cache if num_kv_blocks is None else replace(cfg.cache, num_kv_blocks=num_kv_blocks)
    engine.config = replace(cfg, cache=cache,
                            parallel=replace(cfg.parallel, expert_parallel_size=world_size,
                                             ep_node_ids=engine.executor.config.parallel.ep_node_ids))
    old = engine.schedulers
    inflight = engine.take_inflight()  # indexed by the old ranks: never for a later regroup
    if keep_runners:
        gone = [s for r, s in enumerate(old) if r not in kept]
        engine.schedulers = [old[r] for r in kept]
        for r, s in zip(kept, engine.schedulers):
            s.rewind(inflight[r] if inflight is not None else None)
    else:
        gone = old
        # One scheduler per TP group (data_parallel_size: the world at tensor_parallel_size 1), each with its KV
        # connector's scheduler half, as the engine built them (the rebuilt runners' worker halves are fresh too).
        kvc = engine.config.kv_connector
        engine.schedulers = [Scheduler(engine.config.scheduler, engine.config.cache,
                                       None if kvc is None else kvc.scheduler_side(g))
                             for g in range(engine.config.parallel.data_parallel_size)]
    retain = getattr(engine.config.kv_connector, "retain_scheduler_sides", None)
    if callable(retain):  # the connector's per-scheduler state (the offload tiers' counters): the live ones only
        retain([None if s.kv_transfers is None else s.kv_transfers.connector for s in engine.schedulers])
    reqs = sorted((req for s in gone for req in s.requests.values()), key=lambda r: r.arrival_time)
    engine.world_size = world_size
    engine.router = LeastLoadedRouter(engine.schedulers)
    for req in reqs:
        engine.schedulers[engine.router.route(req.all_token_ids, req.cache_salt)].requeue(req)
    engine.index_requests()
    engine.ep_plan = engine.executor.plan
    if engine.eplb is not None:
        # The ranks' layers run the new plan (rebuilt from it, or kept and switched to it: any per-layer EPLB
        # placement, which keeping refuses, and a move under way are gone): online EPLB starts over from it,
        # its window and tables being for the old group. A placement EPLB cannot re-place (uneven slots) turns
        # it off, said once.
        from .eplb_controller import make_eplb_controller

        try:
            engine.eplb = make_eplb_controller(engine.config, engine.ep_plan)
        except ValueError as err:
            logger.warning("online EPLB off after the regroup: %s", err)
            engine.eplb = None
    engine.moe_metrics.regroup(kept)
    return reqs


def recover_engine(engine) -> RecoveryResult:
    """Recover the engine's executor, then requeue every unfinished request on the new ranks' schedulers."""
    stats: ElasticStats = engine.elastic_stats
    t0 = time.monotonic()
    try:
        result = engine.executor.recover()
    except BaseException:
        stats.rank_losses += 1
        stats.failed_recoveries += 1
        raise
    dead = set(result.dead_ranks)
    tp = engine.config.parallel.tensor_parallel_size  # one scheduler per TP group: rank r's is r // tp
    on_lost = sum(len(engine.schedulers[g].requests) for g in {r // tp for r in dead} if g < len(engine.schedulers))
    reqs = regroup_engine(engine, result.num_kv_blocks, list(result.survivors), keep_runners=result.kept_runners)
    seconds = time.monotonic() - t0
    stats.rank_losses += len(dead)
    stats.recoveries += 1
    stats.recovery_seconds_total += seconds
    stats.last_recovery_seconds = seconds
    stats.requests_requeued += len(reqs)
    stats.requests_on_lost_ranks += on_lost
    stats.recoveries_keeping_runners += result.kept_runners
    stats.history.append(replace(result, seconds=seconds))
    logger.warning("elastic EP: %d request(s) requeued (%d from the lost rank(s)); recovery took %.2f s",
                   len(reqs), on_lost, seconds)
    return result


__all__ = ["ElasticStats", "RecoveryResult", "lost_tp_groups", "recover_engine", "recover_ranks", "reform_group",
           "regroup_engine"]
