"""Executors: run one step on every rank's worker. The interface and the in-process executor here; Ray's
(`ray_executor.py`) shares the interface; `executor_factory.make_executor` picks one."""
from __future__ import annotations

from abc import ABC, abstractmethod

from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

from ..config.engine_args import EngineConfig
from ..contract.ep_step import attach_ep_step
from ..contract.expert_parallel import ExpertParallelPlan, plan_expert_parallel
from ..config.kv_sizing import common_num_kv_blocks
from ..contract.worker_api import LaunchedStep, RankCall, rank_call


class Executor(ABC):
    """`execute(outputs_per_rank) -> results_per_rank`; all ranks step together."""

    world_size: int = 1
    plan: ExpertParallelPlan  # what every rank runs (engine/contract/expert_parallel.py)

    @property
    def dead_error(self) -> Exception | None:
        """Set once a rank is lost (or the executor is shut down): the engine cannot step any more."""
        return None

    @property
    def lost_error(self) -> Exception | None:
        """Elastic EP (engine/cluster/elastic.py): a rank lost that the engine may still recover from (`recover()`);
        None when nothing is lost, or on an executor that cannot recover (then a loss is `dead_error`)."""
        return None

    @property
    def rejoin_ready(self) -> bool:
        """Rejoin (engine/cluster/rejoin.py): replacement ranks are ready to be admitted (`admit()`) at a step
        boundary."""
        return False

    @abstractmethod
    def execute(self, outputs_per_rank: list[SchedulerOutput]) -> list[ModelRunnerOutput]: ...

    def launch(self, outputs_per_rank: list[SchedulerOutput]) -> LaunchedStep:
        """The overlapped loop: start a step on every rank and return without waiting for it; `collect(launched)`
        (after the next step's launch) returns its outputs. Steps are collected in launch order. This default
        runs the step at once (executors that cannot overlap)."""
        return LaunchedStep(tuple(so.step_id for so in outputs_per_rank), tuple(self.execute(outputs_per_rank)))

    def collect(self, launched: LaunchedStep) -> list[ModelRunnerOutput]:
        """The outputs of a launched step, in rank order (waits for it)."""
        if launched.outputs is None:
            raise TypeError(f"{type(self).__name__}.collect: {launched!r} was not launched by this executor.")
        return list(launched.outputs)

    def shutdown(self) -> None:
        pass

    def initialize_kv_cache(self) -> int:
        """Size the KV cache from what every rank has left after loading its weights:
        each rank gets the same number of blocks, the smallest any rank can hold."""
        blocks = common_num_kv_blocks(self.collective(RankCall.AVAILABLE_KV_BLOCKS))
        self.collective(RankCall.ALLOCATE_KV_CACHE, blocks)
        self._ep_graph_sizes = None  # new cache, new graphs
        return blocks

    _ep_graph_sizes: tuple[int, ...] | None = None

    def warm_up(self, cfg) -> list:
        """Every rank's `Worker.warm_up(cfg)` (engine/rank/warmup.py), together; their WarmupReports in rank order."""
        return self.collective(RankCall.WARM_UP, cfg)

    def plan_ep_step(self, outputs_per_rank: list[SchedulerOutput]) -> None:
        """Give every rank's output the step's EP plan (engine/contract/ep_step.py) when the backend runs two modes.

        The decode graph sizes every rank captured are asked once (and again after the KV cache is re-made):
        the plan only names a size all ranks hold."""
        decode_capacity = self.plan.decode_capacity
        if decode_capacity is None:
            return
        if self._ep_graph_sizes is None:
            captured = [set(s) for s in self.collective(RankCall.CAPTURED_GRAPH_SIZES)]
            self._ep_graph_sizes = tuple(sorted(set.intersection(*captured))) if captured else ()
        attach_ep_step(outputs_per_rank, decode_capacity, self._ep_graph_sizes)

    def collective(self, method: RankCall, *args) -> list:
        """Run a Worker call (engine/contract/worker_api.py) on every rank together; results in rank order."""
        return self._call_ranks(rank_call(method).value, *args)

    # The name the EP tests call it by.
    _collective = collective

    @abstractmethod
    def _call_ranks(self, name: str, *args) -> list:
        """The transport: the Worker method `name` on every rank; results in rank order."""

    def check_health(self) -> None:
        """Raise if a worker is gone."""
        if self.dead_error is not None:
            raise self.dead_error


def rank_name(rank: int, tensor_parallel_size: int = 1, expert_parallel_size: int = 1) -> str:
    """World rank `rank` named by what it is in this layout, for a loss message: under EP alone an
    expert-parallel rank; under -tp alone (one TP group, the experts split over it) a tensor-parallel rank; under
    TP x EP both at once, so the world rank and its TP group (a loss takes the whole group out)."""
    if tensor_parallel_size <= 1:
        return f"expert-parallel rank {rank}" if expert_parallel_size > 1 else f"rank {rank}"
    if expert_parallel_size <= 1:
        return f"tensor-parallel rank {rank}"
    return f"rank {rank} (TP group {rank // tensor_parallel_size})"


class WorkerDiedError(RuntimeError):
    """A rank's worker is gone, hung or silent; the engine cannot step any more. `name`: the rank as
    `rank_name` calls it in the engine's layout (None: an expert-parallel rank, the layout before TP)."""

    def __init__(self, rank: int, reason: str, what: str = "died", name: str | None = None):
        self.name = name if name is not None else f"expert-parallel rank {rank}"
        super().__init__(f"{self.name} {what}: {reason}")
        self.rank, self.reason, self.what = rank, reason, what


class InProcessExecutor(Executor):
    """One rank, in this process: no Ray, no process group. `plan`: the engine's (built from config if None)."""

    def __init__(self, config: EngineConfig, plan: ExpertParallelPlan | None = None):
        from ..rank.worker import Worker
        from .step_features import STEP_FEATURES

        self.plan = plan if plan is not None else plan_expert_parallel(config)
        self.worker = Worker(config.worker_config(), rank=0, plan=self.plan, step_features=STEP_FEATURES)
        self.worker.load()

    @property
    def runner(self):
        return self.worker.runner

    def _call_ranks(self, name: str, *args) -> list:
        return [getattr(self.worker, name)(*args)]

    def execute(self, outputs_per_rank: list[SchedulerOutput]) -> list[ModelRunnerOutput]:
        return self.collect(self.launch(outputs_per_rank))

    def launch(self, outputs_per_rank: list[SchedulerOutput]) -> LaunchedStep:
        (so,) = outputs_per_rank
        self.plan_ep_step(outputs_per_rank)
        # No peers to join in an all-to-all: an empty step (e.g. one that only
        # carries finished ids) runs no model code.
        self.worker.launch(so, run_forward=not so.is_empty)
        return LaunchedStep((so.step_id,))

    def collect(self, launched: LaunchedStep) -> list[ModelRunnerOutput]:
        (step_id,) = launched.step_ids
        return [self.worker.collect(step_id)]

    def shutdown(self) -> None:
        """Stop the step stream, close the KV connector and give the device memory back: the model, KV cache and
        graphs are dropped here, not when the engine object dies, since a caller commonly still holds it (`with
        LLM(...) as llm:` keeps `llm` bound while the next engine loads; on one GPU the second engine then found no
        memory, 2026-11-26). Idempotent."""
        if self.worker.runner is None:
            return
        self.worker.close_runner()
        if self.worker.device.type == "cuda":
            # Cycles inside the modules hold tensors past the last reference; the allocator's cache holds the
            # freed blocks from the next engine's allocations of other sizes. On CPU neither costs a collect.
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

