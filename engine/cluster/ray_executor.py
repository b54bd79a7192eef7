"""RayExecutor: one worker actor per rank, placed by a Ray placement group, stepped in lockstep.

    driver (LLMEngine) ──execute([so_0 … so_N-1])──▶ actor 0 … actor N-1 (one per GPU or CPU bundle)
                                                       └── all-to-all among themselves (gloo / NCCL)

Ray is started locally when `ray_address` is None (on 127.0.0.1, in a temp dir of its own that
is removed at shutdown, watched by a guard process that cleans up after a SIGKILLed server: see
`LocalRay`), joined with "auto" (a cluster started by `ray start`) or an explicit address.

Watchdogs. A rank that is lost must fail the engine, not leave it silently stuck:
- a worker that dies fails the step within seconds with an error naming its rank;
- heartbeats: every second the driver pings every rank on a thread of the rank's own (a Ray
  concurrency group), so a rank answers in the middle of a step, a collective or a compile; a
  rank silent for `heartbeat_timeout_s` (SIGSTOP, D state, a wedged or unreachable host) fails
  the engine, whether a step is running or the engine is idle;
- the step watchdog: a step that runs longer than `step_timeout_s` (the first model step, which
  compiles kernels: at least FIRST_STEP_TIMEOUT_S) fails the engine.
On any of these the survivors, possibly blocked in a collective with the lost rank, are killed
rather than left to hang, and the engine reports the first failure. With elastic EP (the default, when
at least 2 ranks would survive) the loss is recorded in `lost_error` instead, the survivors live on,
and the engine recovers at EP N-1 (engine/cluster/elastic.py, `recover`); with rejoin on, a replacement rank is then
started in the freed bundle and admitted at a step boundary, back to EP N (engine/cluster/rejoin.py, `admit`).

Everything the executor holds in Ray (actors, placement group, a Ray it started) is released by
`shutdown()`, and also when the executor is garbage-collected or the interpreter exits.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from moelink.comm.two_level import node_numbers
from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

from ..config.engine_args import EngineConfig
from .ep_group import EPGroup
from .rank_pool import RANK_POOL, park, take_parked
from .executor import Executor, WorkerDiedError, rank_name
from ..contract.expert_parallel import ExpertParallelPlan, plan_expert_parallel
from ..contract.worker_api import LaunchedStep
from .ray_runtime import (  # noqa: F401  (re-exported: tests and callers import them from here)
    _HEARTBEAT_GROUP, _HEARTBEAT_INTERVAL_S, _LOST_POLL_S, _PG_TIMEOUT_S, RAY_LOOPBACK_ENV, ExecutorShutDown,
    LocalRay, _heartbeats, _RayState, bundle_node_ids, ray_on_loopback,
)
from ..config.timeouts import FIRST_STEP_TIMEOUT_S

logger = logging.getLogger(__name__)
# After a rank's step raised, how long the other ranks' answers are awaited for one whose actor died (the cause).
_PEER_DEATH_WAIT_S = 5.0


@functools.lru_cache(maxsize=None)
def _worker_actor_class():
    import ray

    from ..rank.worker import Worker

    # One extra thread per actor answers heartbeats; steps keep the default group's single thread.
    return ray.remote(concurrency_groups={_HEARTBEAT_GROUP: 1})(Worker)


def start_worker(state, gpu: bool, worker_config, plan: ExpertParallelPlan, bundle: int):
    """A Worker actor for rank `bundle` in that bundle of the placement group (at start, and a replacement)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from .step_features import STEP_FEATURES

    return _worker_actor_class().options(
        num_cpus=1, num_gpus=1 if gpu else 0,
        scheduling_strategy=PlacementGroupSchedulingStrategy(state.pg, placement_group_bundle_index=bundle),
    ).remote(worker_config, bundle, plan, STEP_FEATURES)


def check_tp_nodes(node_ids, tp: int) -> None:
    """A TP group all-reduces every layer: its ranks must share a node (NVLink), never span the network."""
    for g in range(0, len(node_ids), tp):
        nodes = set(node_ids[g:g + tp])
        if tp > 1 and len(nodes) > 1:
            raise ValueError(f"tensor_parallel_size={tp} is invalid on this cluster: ranks {g}..{g + tp - 1} (one TP "
                             f"group) were placed on {len(nodes)} nodes; a TP group stays inside one node, so "
                             f"tensor_parallel_size must divide the GPUs of a node.")

if TYPE_CHECKING:  # typing only: Ray is imported where a Ray executor starts (ray_runtime)
    from ray import ObjectRef


@dataclass(frozen=True)
class RayLaunchedStep(LaunchedStep):
    """A step sent to the rank actors: their `launch` calls still running (`refs`, rank order) and how long
    `collect` waits for them and for the rank's answer (`timeout_s`, the step watchdog's bound)."""

    refs: tuple[ObjectRef, ...] = ()
    timeout_s: float = 0.0


def tp_group_outputs(outs: list[ModelRunnerOutput], tp: int, merge: bool) -> list[ModelRunnerOutput]:
    """One output per TP group: its first rank's (the group's ranks sampled the same tokens), with the MoE counters
    of all its ranks merged when `merge` (EP over the world: each routed and dispatched its own slice of the
    group's tokens; experts split by TP instead: every rank routed every token, the first's counts are the group's)."""
    from moelink.moe.stats import merge_counters

    firsts = []
    for g in range(0, len(outs), tp):
        first, moe = outs[g], [o.stats.moe for o in outs[g:g + tp] if o.stats is not None and o.stats.moe is not None]
        if merge and moe and first.stats is not None:
            first.stats = replace(first.stats, moe=merge_counters(moe))
        firsts.append(first)
    return firsts


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, plan: ExpertParallelPlan | None = None):
        import ray
        from ray.util.placement_group import placement_group

        n = config.parallel.world_size
        # The engine's plan (built here from config if None), shipped to every rank: before Ray starts, so a
        # placement or backend that cannot work fails on the driver.
        plan = plan if plan is not None else plan_expert_parallel(config)
        # The membership (engine/cluster/ep_group.py): rank r starts in bundle r; filled in as the ranks start.
        self.group = EPGroup(0, config, plan, tuple(range(n)))
        self._tp = config.parallel.tensor_parallel_size  # ranks per TP group: consecutive, on one node
        self._state = state = _RayState()
        state.elastic = config.parallel.elastic_ep
        state.tp, state.ep = self._tp, config.parallel.expert_parallel_size
        # Releases the actors, the placement group and a Ray we started when this executor is collected
        # (or at exit), if shutdown() was not called; calling it is shutdown().
        self._finalizer = weakref.finalize(self, state.release)
        self._model_steps = 0
        self._steps_in_flight = 0  # launched and not collected (engine/cluster/rank_pool.py parks none then)
        self.rejoiner = None
        # Elastic EP: ranks the next recovery drops even when they answer (a rejoin that failed midway).
        self._rejoin_drop: tuple[int, ...] = ()
        try:
            if not ray.is_initialized():
                address = config.parallel.ray_address
                if address is None:
                    # Enough CPU slots for one bundle per rank even on a small machine.
                    state.local = LocalRay(num_cpus=max(n, os.cpu_count() or 1))
                else:
                    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
                    state.connected = True
            gpu = config.device.type == "cuda"
            bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
            # Rank processes a clean shutdown of an engine of as many ranks parked on this Ray (rank_pool.py).
            parked = take_parked(state, n, gpu)
            if parked is not None:
                state.pg = parked.pg
            else:
                state.pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
                try:
                    ray.get(state.pg.ready(), timeout=_PG_TIMEOUT_S)
                except Exception as exc:
                    resources = ray.cluster_resources()
                    raise RuntimeError(
                        f"Ray cannot place {n} workers of {bundle} each within {_PG_TIMEOUT_S:.0f} s "
                        f"(cluster resources: {resources}): add nodes or lower expert_parallel_size."
                    ) from exc
            node_ids = bundle_node_ids(state.pg, n)
            check_tp_nodes(node_ids, self._tp)
            if plan.backend.needs_node_map and plan.node_of_rank is None:
                # The node-aware all-to-all's default node map: ranks on one Ray node share an NVLink domain.
                plan = replace(plan, node_of_rank=node_numbers(node_ids))
            start = functools.partial(start_worker, state, gpu, config.worker_config(), plan)  # pickled per rank
            if parked is not None:
                # The same processes, each made this engine's rank r (the bundle it is in) as a new actor would be;
                # a bundle whose rank the parked engine lost (elastic EP) is free: a fresh rank starts there.
                kept = parked.by_bundle()
                state.workers = workers = [kept[r] if r in kept else start(r) for r in range(n)]
                RANK_POOL.starts_fresh += n - len(kept)
                cfg = config.worker_config()
                from .step_features import STEP_FEATURES

                pids = self._get([w.reinit.remote(cfg, r, plan, STEP_FEATURES) if r in kept
                                  else w.heartbeat.options(concurrency_group=_HEARTBEAT_GROUP).remote()
                                  for r, w in enumerate(workers)])
            else:
                state.workers = workers = [start(r) for r in range(n)]
                RANK_POOL.starts_fresh += n
                pids = self._get([w.heartbeat.options(concurrency_group=_HEARTBEAT_GROUP).remote() for w in workers])
            addr, port = self._get([workers[0].pick_master.remote()])[0]
            # Every rank must enter the rendezvous together, so these run concurrently.
            self._get([w.init_distributed.remote(addr, port) for w in workers])
            self._get([w.load.remote() for w in workers])
        except BaseException:
            self.shutdown()  # a retry must not find our half-used instance
            raise
        # Formed: the start's membership is complete (still epoch 0).
        self.group = replace(self.group, plan=plan, workers=tuple(workers), rank_pids=tuple(pids),
                             node_ids=tuple(node_ids), master_addr=addr, master_port=port)
        # The original EP-N config, plan and nodes a rejoin returns to (engine/cluster/rejoin.py).
        self.full_config, self.full_plan, self.full_node_ids = config, plan, list(node_ids)
        if config.parallel.elastic_ep and config.parallel.rejoin_enabled:
            from .rejoin import Rejoiner

            self.rejoiner = Rejoiner(start, state, config.parallel.ep_rejoin_delay_s)
        self.start_heartbeats()
        self._formed = True
        logger.info("RayExecutor: %d ranks ready (pids %s, rendezvous %s:%d%s)", n, list(pids), addr, port,
                    ", processes reused" if parked is not None else "")

    # -- membership (engine/cluster/ep_group.py): read from the group, changed only by adopt / commit -----------------
    world_size = property(lambda self: self.group.world_size)
    config = property(lambda self: self.group.config)
    plan = property(lambda self: self.group.plan)
    rank_pids = property(lambda self: list(self.group.rank_pids))
    node_ids = property(lambda self: list(self.group.node_ids))
    bundles = property(lambda self: list(self.group.bundles))
    master_addr = property(lambda self: self.group.master_addr)
    master_port = property(lambda self: self.group.master_port)

    def adopt(self, group: EPGroup, drop_on_recovery: tuple[int, ...] = ()) -> None:
        """Make `group` the executor's membership: its ranks are the ones stepped, watched and killed from now on.
        `drop_on_recovery`: ranks the next recovery drops even if they answer (a rejoin that failed midway)."""
        if group.epoch <= self.group.epoch and group is not self.group:
            raise ValueError(f"EPGroup.epoch={group.epoch} is invalid: the executor's group is at epoch "
                             f"{self.group.epoch}; a transition builds the next one (EPGroup.next).")
        self.group = group
        self._state.workers = list(group.workers)
        self._state.ep = group.config.parallel.expert_parallel_size  # elastic EP shrinks it; names follow
        self._rejoin_drop = tuple(drop_on_recovery)
        self._ep_graph_sizes = None  # the new ranks' captured graphs are asked again

    def commit(self, group: EPGroup) -> None:
        """Adopt a group that formed (its ranks rendezvoused and loaded): clear the loss it answered and start
        the heartbeats of its generation."""
        self.adopt(group)
        # Its ranks rendezvoused and loaded on their step threads, so no step sent before is still running there:
        # one the loss broke and no collect ever waited for counts no more (rank_pool.py parks only with none out).
        self._steps_in_flight = 0
        state = self._state
        with state.lock:
            state.lost = None
            state.generation += 1
        self.start_heartbeats()

    def rank_name(self, rank: int) -> str:
        """World rank `rank` as a loss message names it in this executor's layout (executor.rank_name)."""
        return rank_name(rank, self._state.tp, self._state.ep)

    def mark_lost(self, err: WorkerDiedError) -> None:
        """Record a loss the engine recovers from at its next step (kept if one is already recorded)."""
        with self._state.lock:
            if self._state.lost is None:
                self._state.lost = err

    def give_up(self, err: WorkerDiedError) -> Exception:
        """A loss elastic EP cannot go on from: it becomes the executor's dead_error (the first one recorded
        stays), every rank is stopped; returns the error to raise."""
        state = self._state
        with state.lock:
            state.lost = None
            if state.dead_error is None:
                state.dead_error = err
        logger.error("%s; stopping the other ranks", err)
        state.kill_workers()
        return state.dead_error

    def start_heartbeats(self) -> None:
        """The heartbeat thread of the current generation (the ranks of now)."""
        par, state = self.config.parallel, self._state
        threading.Thread(target=_heartbeats, name="moelink-heartbeat", daemon=True,
                         args=(state, min(_HEARTBEAT_INTERVAL_S, par.heartbeat_timeout_s / 4),
                               par.heartbeat_timeout_s, state.generation)).start()

    def heartbeat_refs(self) -> list:
        """One heartbeat per rank, answered on the rank's heartbeat thread (also mid-step)."""
        return [w.heartbeat.options(concurrency_group=_HEARTBEAT_GROUP).remote() for w in self.workers]

    @property
    def lost_error(self) -> Exception | None:
        return self._state.lost

    def recover(self):
        """Go on without the lost rank(s) at EP N-1 (engine/cluster/elastic.py); raises the loss when it cannot. With
        rejoin on, the freed bundles then get replacements in the background (engine/cluster/rejoin.py)."""
        from .elastic import recover_ranks

        drop, self._rejoin_drop = self._rejoin_drop, ()
        # After a failed rejoin (`drop` is its replacements) the survivors' runners may have been rebuilt by it,
        # their request states and KV gone: they cannot be kept, every request is recomputed.
        result = recover_ranks(self, drop_if_all_alive=drop, keep=not drop)
        if self.rejoiner is not None:
            self.rejoiner.lost(sorted(set(range(self.full_plan.placement.ep_size)) - set(self.bundles)))
        return result

    @property
    def rejoin_ready(self) -> bool:
        """Every freed bundle has a pre-loaded replacement: the engine admits them at its next step boundary."""
        return self.rejoiner is not None and self.rejoiner.ready and self._state.lost is None

    def admit(self):
        """Admit the replacements: back to EP N (engine/cluster/rejoin.py). None when none was ready after all."""
        from .rejoin import admit_ranks

        return admit_ranks(self)

    @property
    def workers(self) -> list:
        return self._state.workers

    @property
    def pg(self):
        return self._state.pg

    @property
    def dead_error(self) -> Exception | None:
        return self._state.dead_error

    @property
    def ray_temp_dir(self) -> str | None:
        """The temp dir of the Ray instance this executor started (None when it joined one)."""
        return self._state.local.temp_dir if self._state.local is not None else None

    def _call_ranks(self, name: str, *args) -> list:
        return self._get([getattr(w, name).remote(*args) for w in self.workers])

    def warm_up(self, cfg) -> list:
        """As Executor.warm_up, bounded like a first step (compiles with a cold cache take minutes), not like a
        set-up call."""
        timeout = max(self.config.parallel.step_timeout_s, FIRST_STEP_TIMEOUT_S)
        return self._get([w.warm_up.remote(cfg) for w in self.workers], timeout=timeout,
                         late=f"its warm-up ran longer than {timeout:g} s")

    # -- stepping ---------------------------------------------------------------
    def step_timeout(self, run_forward: bool) -> float:
        """The step watchdog's bound for the next step: the first model step compiles kernels."""
        timeout = self.config.parallel.step_timeout_s
        return max(timeout, FIRST_STEP_TIMEOUT_S) if run_forward and self._model_steps == 0 else timeout

    def execute(self, outputs_per_rank: list[SchedulerOutput]) -> list[ModelRunnerOutput]:
        return self.collect(self.launch(outputs_per_rank))

    def launch(self, outputs_per_rank: list[SchedulerOutput]) -> RayLaunchedStep:
        """Send the step to every rank (each does its host work and queues its device work) without waiting:
        the driver schedules the next step meanwhile. Returns what `collect` needs."""
        self.check_health()
        if self._state.lost is not None:  # elastic: lost while idle; the engine recovers before stepping
            raise self._state.lost
        # Ranks with nothing scheduled still join every all-to-all while any rank has tokens.
        run_forward = any(not so.is_empty for so in outputs_per_rank)
        if run_forward:
            self.plan_ep_step(outputs_per_rank)
        timeout = self.step_timeout(run_forward)
        # Tensor parallelism: the engine holds one scheduler per TP group (data_parallel_size); every rank of a
        # group runs its group's step (the same SchedulerOutput), ranks g*tp .. g*tp + tp - 1.
        per_rank = [so for so in outputs_per_rank for _ in range(self._tp)]
        refs = [w.launch.remote(so, run_forward) for w, so in zip(self.workers, per_rank)]
        self._model_steps += run_forward
        self._steps_in_flight += 1  # until its collect ends, however (a rank stuck in it is not parked)
        return RayLaunchedStep(tuple(so.step_id for so in per_rank), refs=tuple(refs), timeout_s=timeout)

    def collect(self, launched: LaunchedStep) -> list[ModelRunnerOutput]:
        """The step's outputs: one round trip (each actor answers after its next step's launch, which the driver
        sent first, so the ranks' host work for that step overlaps this one's device work)."""
        if not isinstance(launched, RayLaunchedStep):
            raise TypeError(f"RayExecutor.collect: {launched!r} was not launched by a RayExecutor.")
        step_ids, launch_refs, timeout = launched.step_ids, list(launched.refs), launched.timeout_s
        late = f"its step ran longer than {timeout:g} s (--step-timeout)"
        try:
            collect_refs = [w.collect.remote(i) for w, i in zip(self.workers, step_ids)]
            self._get(launch_refs, timeout=timeout, late=late)  # a launch that raised names its rank here
            # Under TP every rank of a group sampled the same tokens (engine/rank/model_runner.py broadcasts the
            # group's first rank's): that rank answers for its group.
            outs = self._get(collect_refs, timeout=timeout, late=late)
        finally:
            self._steps_in_flight -= 1
        return outs if self._tp == 1 else tp_group_outputs(outs, self._tp, merge=self.plan.world_size > 1)

    def _get(self, refs, timeout: float = _PG_TIMEOUT_S, late: str | None = None) -> list:
        """ray.get over one ref per rank that names the first rank to fail, and never hangs. A rank whose actor died
        is named before one whose step raised: when a rank is killed, its peers' collectives fail too (gloo's
        "Connection reset by peer"), and a peer's error may come back first; the others are awaited
        _PEER_DEATH_WAIT_S more to find the one that died."""
        import ray

        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        deadline = time.monotonic() + timeout
        raised: tuple[int, str] | None = None  # the first rank whose step raised, blamed unless a rank died
        while pending:
            if raised is not None:  # a step raised: a peer's broken collective, whose cause may be a rank that died
                deadline = min(deadline, time.monotonic() + _PEER_DEATH_WAIT_S)
                if time.monotonic() >= deadline:
                    break
            # Elastic: a rank the heartbeats lost ends the wait now (its peers may sit in a collective with it).
            wait_s = max(deadline - time.monotonic(), 0.0)
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=min(wait_s, _LOST_POLL_S) if self._state.elastic else wait_s)
            if not ready and self._state.lost is not None:
                raise self._state.lost
            if not ready and time.monotonic() < deadline:
                continue
            if not ready and raised is not None:
                break
            if not ready:
                late_ranks = sorted(rank_of[ref] for ref in pending)
                self._fail(late_ranks[0], (late or f"no answer within {timeout:.0f} s")
                           + (f" (ranks {late_ranks} had not answered)" if len(late_ranks) > 1 else ""), "is stuck")
            ref = ready[0]
            try:
                results[rank_of[ref]] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._fail(rank_of[ref], f"its actor died ({type(exc).__name__})")
            except ray.exceptions.RayTaskError as exc:
                if raised is None:
                    raised = (rank_of[ref], f"its step raised {exc.cause!r}" if hasattr(exc, "cause") else str(exc))
        if raised is not None:
            self._fail(*raised)
        return results

    def _fail(self, rank: int, reason: str, what: str = "died"):
        # A rank the heartbeats found silent is reported as such, not as the survivor we killed after it.
        raise self._state.fail(self._state.died(rank, reason, what))

    def check_health(self) -> None:
        if self._state.dead_error is not None:
            raise self._state.dead_error

    # -- teardown -------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kill the actors, remove the placement group, shut down a Ray we started (idempotent). With the rank pool
        on (rank_pool.py), an engine on a Ray it did not start parks its idle rank processes instead (after a
        recovery, its survivors)."""
        if getattr(self, "_formed", False):
            self._formed = False
            if self._steps_in_flight != 0:  # a step still out may hold a rank (a frozen one, a hung collective)
                logger.debug("rank processes not parked: %d step(s) still out", self._steps_in_flight)
            else:
                park(self._state, self.group, self.full_config.parallel.world_size, self.rejoiner)
        self._finalizer()
