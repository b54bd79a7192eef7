"""RayExecutor: one worker actor per rank, placed by a Ray placement group, stepped in lockstep.

    driver (LLMEngine) ──execute([so_0 … so_N-1])──▶ actor 0 … actor N-1 (one per GPU or CPU bundle)
                                                       └── all-to-all among themselves (gloo / NCCL)

Ray is started locally when `ray_address` is None, joined with "auto" (a
cluster started by `ray start`) or an explicit address. A worker that dies
fails the step within seconds with an error naming its rank: the survivors,
possibly blocked in a collective with the dead rank, are killed rather than
left to hang.
"""
from __future__ import annotations

import logging
import os
import time

from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

from .engine_args import EngineConfig
from .executor import Executor, WorkerDiedError

logger = logging.getLogger(__name__)

_PG_TIMEOUT_S = 120.0


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from .worker import Worker

        self.config = config
        self.world_size = config.parallel.world_size
        self._started_ray = False
        self.dead_error: WorkerDiedError | None = None
        if not ray.is_initialized():
            address = config.parallel.ray_address
            # "local" forces a fresh instance: a stale /tmp/ray/ray_current_cluster must not redirect us.
            kwargs = dict(address=address or "local", include_dashboard=False, ignore_reinit_error=True,
                          log_to_driver=True)
            if address is None:
                # A local instance: enough CPU slots for one bundle per rank even on a small machine.
                kwargs["num_cpus"] = max(self.world_size, os.cpu_count() or 1)
            ray.init(**kwargs)
            self._started_ray = True
        gpu = config.device.type == "cuda"
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        try:
            ray.get(self.pg.ready(), timeout=_PG_TIMEOUT_S)
        except Exception as exc:
            resources = ray.cluster_resources()
            ray.util.remove_placement_group(self.pg)
            if self._started_ray:  # a retry must not find our half-used instance
                ray.shutdown()
                self._started_ray = False
            raise RuntimeError(
                f"Ray cannot place {self.world_size} workers of {bundle} each within {_PG_TIMEOUT_S:.0f} s "
                f"(cluster resources: {resources}): add nodes or lower expert_parallel_size."
            ) from exc
        actor_cls = ray.remote(Worker)
        self.workers = [
            actor_cls.options(
                num_cpus=1, num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(config, r)
            for r in range(self.world_size)
        ]
        try:
            master_addr, master_port = self._get([self.workers[0].pick_master.remote()])[0]
            # Every rank must enter the rendezvous together, so these run concurrently.
            self._get([w.init_distributed.remote(master_addr, master_port) for w in self.workers])
            self._get([w.load.remote() for w in self.workers])
        except BaseException:
            self.shutdown()
            raise
        logger.info("RayExecutor: %d ranks ready (rendezvous %s:%d)", self.world_size, master_addr, master_port)

    def _collective(self, method: str, *args) -> list:
        return self._get([getattr(w, method).remote(*args) for w in self.workers])

    # -- stepping ---------------------------------------------------------------
    def execute(self, outputs_per_rank: list[SchedulerOutput]) -> list[ModelRunnerOutput]:
        if self.dead_error is not None:
            raise self.dead_error
        # Ranks with nothing scheduled still join every all-to-all while any rank has tokens.
        run_forward = any(not so.is_empty for so in outputs_per_rank)
        refs = [w.execute.remote(so, run_forward) for w, so in zip(self.workers, outputs_per_rank)]
        return self._get(refs, timeout=self.config.parallel.step_timeout_s)

    def _get(self, refs, timeout: float = _PG_TIMEOUT_S) -> list:
        """ray.get over one ref per rank that names the first rank to fail, and never hangs."""
        import ray

        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: list = [None] * len(refs)
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0.0))
            if not ready:
                self._fail(rank_of[pending[0]], f"no answer within {timeout:.0f} s")
            ref = ready[0]
            try:
                results[rank_of[ref]] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                self._fail(rank_of[ref], f"its actor died ({type(exc).__name__})")
            except ray.exceptions.RayTaskError as exc:
                self._fail(rank_of[ref], f"its step raised {exc.cause!r}" if hasattr(exc, "cause") else str(exc))
        return results

    def _fail(self, rank: int, reason: str):
        self.dead_error = WorkerDiedError(rank, reason)
        logger.error("%s; stopping the other ranks", self.dead_error)
        self._kill_workers()
        raise self.dead_error

    def check_health(self) -> None:
        if self.dead_error is not None:
            raise self.dead_error

    # -- teardown -------------------------------------------------------------------
    def _kill_workers(self) -> None:
        import ray

        for w in getattr(self, "workers", []):
            try:
                ray.kill(w, no_restart=True)
            except Exception:  # already gone
                pass

    def shutdown(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        self._kill_workers()
        self.workers = []
        try:
            ray.util.remove_placement_group(self.pg)
        except Exception:
            pass
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
