"""Executors: run one step on every rank's worker. In-process here; Ray shares the interface."""
from __future__ import annotations

from abc import ABC, abstractmethod

from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

from .engine_args import EngineConfig
from .model_runner import ModelRunner


class Executor(ABC):
    """`execute(outputs_per_rank) -> results_per_rank`; all ranks step together."""

    world_size: int = 1

    @abstractmethod
    def execute(self, outputs_per_rank: list[SchedulerOutput]) -> list[ModelRunnerOutput]: ...

    def shutdown(self) -> None:
        pass

    def check_health(self) -> None:
        """Raise if a worker is gone."""


class InProcessExecutor(Executor):
    """One rank, in this process: no Ray, no process group."""

    def __init__(self, config: EngineConfig):
        self.runner = ModelRunner(
            config.model, config.cache.block_size, config.cache.num_kv_blocks, config.device,
            kernels=config.kernels, load_progress=config.load_progress,
        )

    def execute(self, outputs_per_rank: list[SchedulerOutput]) -> list[ModelRunnerOutput]:
        (so,) = outputs_per_rank
        return [self.runner.execute_model(so)]
