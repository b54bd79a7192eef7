"""make_executor: the one place that picks an executor.

It lives apart from both executors: in executor.py it had to import ray_executor.py, which imports
executor.py for the interface, a cycle. Now ray_executor.py imports executor.py only, and neither imports this.
"""
from __future__ import annotations

from .engine_args import EngineConfig
from .executor import Executor, InProcessExecutor


def make_executor(config: EngineConfig) -> Executor:
    """One executor per engine, chosen once from the parallel config."""
    kind = config.parallel.resolved_executor
    if kind == "inprocess":
        return InProcessExecutor(config)
    # Lazy: Ray is imported only by engines that run more than one rank.
    from .ray_executor import RayExecutor

    return RayExecutor(config)
