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
and the engine recovers at EP N-1 (engine/elastic.py, `recover`).

Everything the executor holds in Ray (actors, placement group, a Ray it started) is released by
`shutdown()`, and also when the executor is garbage-collected or the interpreter exits.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import replace

from moelink.comm.two_level import node_numbers
from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

from .engine_args import EngineConfig
from .executor import Executor, WorkerDiedError
from .expert_parallel import ExpertParallelPlan, plan_expert_parallel
from .timeouts import FIRST_STEP_TIMEOUT_S

logger = logging.getLogger(__name__)

_PG_TIMEOUT_S = 120.0
_HEARTBEAT_GROUP = "heartbeat"
_HEARTBEAT_INTERVAL_S = 1.0
_GUARD_EXIT_WAIT_S = 15.0
_LOST_POLL_S = 0.25


class ExecutorShutDown(RuntimeError):
    """The executor was shut down while a step was running."""


RAY_LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_on_loopback():
    """Make the Ray about to be started a loopback one.

    Ray replaces a node address of 127.0.0.1 by this host's routable address and then binds its
    GCS, raylet and worker servers on every interface, unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
    ("one-node cluster"; the same setting deploy/ray/start_head.sh uses for --node-ip 127.0.0.1).
    Every Ray process reads it when it imports Ray: the processes started here inherit it from the
    environment, and this process, which imported Ray already, gets its constant set meanwhile.
    """
    old_env = os.environ.get(RAY_LOOPBACK_ENV)
    os.environ[RAY_LOOPBACK_ENV] = "0"
    try:
        from ray._private import ray_constants
    except ImportError:  # a Ray without that module: the environment variable is all we can do
        ray_constants = None
    old_const = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    if old_const is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if old_const is not None:
            ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(RAY_LOOPBACK_ENV, None)
        else:
            os.environ[RAY_LOOPBACK_ENV] = old_env


class LocalRay:
    """A Ray instance this process starts for itself, and everything it leaves on disk.

    It lives in a fresh temp dir (under $RAY_TMPDIR, else /tmp: Ray's socket paths must stay
    short) instead of /tmp/ray, binds 127.0.0.1 (all its ranks are on this host), and comes with
    a guard process (`ray_guard.py`) that stops its processes and removes the dir once this
    process is gone, however it went. `close()` shuts Ray down and removes the dir itself.
    """

    def __init__(self, num_cpus: int):
        import ray

        base = os.environ.get("RAY_TMPDIR") or "/tmp"
        self.temp_dir = tempfile.mkdtemp(prefix="moelink-ray-", dir=base)
        self.guard: subprocess.Popen | None = None
        self._closed = False
        try:
            from . import ray_guard

            # Started before Ray, so a kill during ray.init is cleaned up too. Its stdin is a pipe only this
            # process holds (close-on-exec: Ray's processes do not inherit it).
            self.guard = subprocess.Popen([sys.executable, ray_guard.__file__, self.temp_dir, str(os.getpid())],
                                          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
            with ray_on_loopback():
                ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
                         _node_ip_address="127.0.0.1", _temp_dir=self.temp_dir)
        except BaseException:
            self.close()
            raise
        logger.info("started a local Ray instance in %s (guard pid %d)", self.temp_dir, self.guard.pid)

    def close(self) -> None:
        """Shut Ray down, let the guard sweep up stragglers, remove the temp dir (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # at interpreter exit Ray may be half torn down already
            logger.warning("could not shut the local Ray instance down cleanly", exc_info=True)
        if self.guard is not None:
            try:
                self.guard.stdin.close()  # EOF: the guard cleans up and exits
                self.guard.wait(_GUARD_EXIT_WAIT_S)
            except Exception:
                logger.warning("Ray clean-up guard (pid %d) did not finish; stopping it", self.guard.pid)
                self.guard.kill()
                self.guard.wait(5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class _RayState:
    """What one RayExecutor holds in Ray, apart from the executor so that the heartbeat thread and the
    finalizer can use it without keeping the executor alive. `release` gives it all back, once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.workers: list = []
        self.pg = None
        self.local: LocalRay | None = None
        self.connected = False  # we called ray.init (a cluster's address): disconnect on release
        self.dead_error: Exception | None = None
        self.stopping = threading.Event()
        self.released = False
        # Elastic EP: a lost rank is recorded in `lost` (the survivors live on) for the engine to recover from;
        # each recovery starts a new heartbeat generation (the old thread ends).
        self.elastic = False
        self.lost: WorkerDiedError | None = None
        self.generation = 0

    def fail(self, error: Exception) -> Exception:
        """Record the first failure, stop every rank; returns the first failure (the one to report). Elastic:
        a lost rank is recorded as `lost` instead and no rank is stopped (engine/elastic.py decides)."""
        if self.elastic and isinstance(error, WorkerDiedError) and len(self.workers) >= 3:  # >= 2 would survive
            with self.lock:
                if self.dead_error is None:
                    if self.lost is None:
                        self.lost = error
                        logger.error("%s; elastic EP will recover without it", error)
                    return self.lost
        with self.lock:
            first = self.dead_error is None
            if first:
                self.dead_error = error
        if first and not isinstance(error, ExecutorShutDown):
            logger.error("%s; stopping the other ranks", error)
        self.kill_workers()
        return self.dead_error

    def kill_workers(self) -> None:
        import ray

        for w in list(self.workers):
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone, or Ray is down
                pass

    def release(self) -> None:
        with self.lock:
            if self.released:
                return
            self.released = True
            if self.dead_error is None:
                self.dead_error = ExecutorShutDown("the Ray executor was shut down")
        self.stopping.set()
        try:
            import ray

            if ray.is_initialized():
                self.kill_workers()
                if self.pg is not None:
                    ray.util.remove_placement_group(self.pg)
        except Exception:
            logger.warning("could not release the Ray workers cleanly", exc_info=True)
        self.workers = []
        self.pg = None
        if self.local is not None:
            self.local.close()
        elif self.connected:
            try:
                import ray

                ray.shutdown()
            except Exception:
                pass


def _heartbeats(state: _RayState, interval_s: float, timeout_s: float, generation: int = 0) -> None:
    """Ping every rank each `interval_s`; a rank silent for `timeout_s`, or dead, fails the executor."""
    import ray

    while not state.stopping.wait(interval_s):
        workers = list(state.workers)
        if state.lost is not None or state.generation != generation:
            return  # elastic: a rank is lost; the recovery starts the next generation's thread
        if not workers or state.dead_error is not None or not ray.is_initialized():
            return  # released, failed, or Ray shut down under us (interpreter exit)
        try:
            refs = [w.heartbeat.options(concurrency_group=_HEARTBEAT_GROUP).remote() for w in workers]
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        except Exception:
            if state.stopping.is_set():
                return
            logger.warning("heartbeat round failed", exc_info=True)
            continue
        if state.stopping.is_set() or state.dead_error is not None or state.generation != generation:
            return
        answered = set(ready)
        for rank, ref in enumerate(refs):
            if ref not in answered:
                state.fail(WorkerDiedError(
                    rank, f"no heartbeat for {timeout_s:g} s: its process is frozen, wedged or unreachable "
                          "(--heartbeat-timeout)", what="is not responding"))
                return
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.RayActorError as exc:
                state.fail(WorkerDiedError(rank, f"its actor died ({type(exc).__name__})"))
                return
            except Exception:  # a heartbeat cannot raise; count it as an answer
                pass


def bundle_node_ids(pg, count: int) -> list[str]:
    """The Ray node id of each of the first `count` bundles of a ready placement group (bundle r is rank r)."""
    import ray

    by_bundle = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    return [by_bundle[r] for r in range(count)]


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig, plan: ExpertParallelPlan | None = None):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .worker import Worker

        self.config = config
        self.world_size = config.parallel.world_size
        # The engine's plan (built here from config if None), shipped to every rank: before Ray starts, so a
        # placement or backend that cannot work fails on the driver.
        self.plan = plan if plan is not None else plan_expert_parallel(config)
        self._state = state = _RayState()
        state.elastic = config.parallel.elastic_ep
        # Releases the actors, the placement group and a Ray we started when this executor is collected
        # (or at exit), if shutdown() was not called; calling it is shutdown().
        self._finalizer = weakref.finalize(self, state.release)
        self._model_steps = 0
        self.rank_pids: list[int] = []
        self.master_addr: str | None = None
        self.master_port: int | None = None
        self.node_ids: list[str] = []  # the Ray node id of each rank's bundle
        try:
            if not ray.is_initialized():
                address = config.parallel.ray_address
                if address is None:
                    # Enough CPU slots for one bundle per rank even on a small machine.
                    state.local = LocalRay(num_cpus=max(self.world_size, os.cpu_count() or 1))
                else:
                    ray.init(address=address, include_dashboard=False, ignore_reinit_error=True, log_to_driver=True)
                    state.connected = True
            gpu = config.device.type == "cuda"
            bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
            state.pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
            try:
                ray.get(state.pg.ready(), timeout=_PG_TIMEOUT_S)
            except Exception as exc:
                resources = ray.cluster_resources()
                raise RuntimeError(
                    f"Ray cannot place {self.world_size} workers of {bundle} each within {_PG_TIMEOUT_S:.0f} s "
                    f"(cluster resources: {resources}): add nodes or lower expert_parallel_size."
                ) from exc
            self.node_ids = bundle_node_ids(state.pg, self.world_size)
            if self.plan.backend.needs_node_map and self.plan.node_of_rank is None:
                # The node-aware all-to-all's default node map: ranks on one Ray node share an NVLink domain.
                self.plan = replace(self.plan, node_of_rank=node_numbers(self.node_ids))
            worker_config = config.worker_config()  # built once, pickled to every rank
            # One extra thread per actor answers heartbeats; steps keep the default group's single thread.
            actor_cls = ray.remote(concurrency_groups={_HEARTBEAT_GROUP: 1})(Worker)
            state.workers = [
                actor_cls.options(
                    num_cpus=1, num_gpus=1 if gpu else 0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(state.pg, placement_group_bundle_index=r),
                ).remote(worker_config, r, self.plan)
                for r in range(self.world_size)
            ]
            self.rank_pids = self._get([w.heartbeat.options(concurrency_group=_HEARTBEAT_GROUP).remote()
                                        for w in state.workers])
            self.master_addr, self.master_port = self._get([state.workers[0].pick_master.remote()])[0]
            # Every rank must enter the rendezvous together, so these run concurrently.
            self._get([w.init_distributed.remote(self.master_addr, self.master_port) for w in state.workers])
            self._get([w.load.remote() for w in state.workers])
        except BaseException:
            self.shutdown()  # a retry must not find our half-used instance
            raise
        self.start_heartbeats()
        logger.info("RayExecutor: %d ranks ready (pids %s, rendezvous %s:%d)", self.world_size, self.rank_pids,
                    self.master_addr, self.master_port)

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
        """Go on without the lost rank(s) at EP N-1 (engine/elastic.py); raises the loss when it cannot."""
        from .elastic import recover_ranks

        return recover_ranks(self)

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

    def _collective(self, method: str, *args) -> list:
        return self._get([getattr(w, method).remote(*args) for w in self.workers])

    # -- stepping ---------------------------------------------------------------
    def step_timeout(self, run_forward: bool) -> float:
        """The step watchdog's bound for the next step: the first model step compiles kernels."""
        timeout = self.config.parallel.step_timeout_s
        return max(timeout, FIRST_STEP_TIMEOUT_S) if run_forward and self._model_steps == 0 else timeout

    def execute(self, outputs_per_rank: list[SchedulerOutput]) -> list[ModelRunnerOutput]:
        self.check_health()
        if self._state.lost is not None:  # elastic: lost while idle; the engine recovers before stepping
            raise self._state.lost
        # Ranks with nothing scheduled still join every all-to-all while any rank has tokens.
        run_forward = any(not so.is_empty for so in outputs_per_rank)
        if run_forward:
            self.plan_ep_step(outputs_per_rank)
        timeout = self.step_timeout(run_forward)
        refs = [w.execute.remote(so, run_forward) for w, so in zip(self.workers, outputs_per_rank)]
        outs = self._get(refs, timeout=timeout, late=f"its step ran longer than {timeout:g} s (--step-timeout)")
        self._model_steps += run_forward
        return outs

    def _get(self, refs, timeout: float = _PG_TIMEOUT_S, late: str | None = None) -> list:
        """ray.get over one ref per rank that names the first rank to fail, and never hangs."""
        import ray

        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            # Elastic: a rank the heartbeats lost ends the wait now (its peers may sit in a collective with it).
            wait_s = max(deadline - time.monotonic(), 0.0)
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=min(wait_s, _LOST_POLL_S) if self._state.elastic else wait_s)
            if not ready and self._state.lost is not None:
                raise self._state.lost
            if not ready and time.monotonic() < deadline:
                continue
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
                self._fail(rank_of[ref], f"its step raised {exc.cause!r}" if hasattr(exc, "cause") else str(exc))
        return results

    def _fail(self, rank: int, reason: str, what: str = "died"):
        # A rank the heartbeats found silent is reported as such, not as the survivor we killed after it.
        raise self._state.fail(WorkerDiedError(rank, reason, what))

    def check_health(self) -> None:
        if self._state.dead_error is not None:
            raise self._state.dead_error

    # -- teardown -------------------------------------------------------------------
    def shutdown(self) -> None:
        """Kill the actors, remove the placement group, shut down a Ray we started (idempotent)."""
        self._finalizer()
