"""make_executor: the one place that picks an executor.

It lives apart from both executors: in executor.py it had to import ray_executor.py, which imports
executor.py for the interface, a cycle. Now ray_executor.py imports executor.py only, and neither imports this.
"""
from __future__ import annotations

from ..config.engine_args import EngineConfig
from .executor import Executor, InProcessExecutor
from ..contract.expert_parallel import ExpertParallelPlan


def make_executor(config: EngineConfig, plan: ExpertParallelPlan | None = None) -> Executor:
    """One executor per engine, chosen once from the parallel config; its workers get `plan`."""
    kind = config.parallel.resolved_executor
    if kind == "inprocess":
        return InProcessExecutor(config, plan)
    if kind == "mp":
        from .mp_executor import MultiprocExecutor

        return MultiprocExecutor(config, plan)
    # Lazy: Ray is imported only by engines that run more than one rank.
    from .ray_executor import RayExecutor

    return RayExecutor(config, plan)
