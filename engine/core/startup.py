"""Bringing an engine's ranks up, in order: the executor (workers with their weights), the KV cache sized by the
ranks themselves, online EPLB's slot sizes, and warm-up. Each step is a collective of the executor; a step that
fails shuts the executor down, so no worker outlives a failed start.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from typing import Iterator

from ..cluster.eplb_controller import EPLBController
from ..cluster.executor import Executor
from ..config.engine_args import EngineConfig
from ..contract.worker_api import RankCall, WarmupConfig, WarmupReport

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def shutdown_on_failure(executor: Executor) -> Iterator[None]:
    """Run a start-up step; on any failure (KeyboardInterrupt too) shut the executor down and re-raise."""
    try:
        yield
    except BaseException:
        executor.shutdown()
        raise


def size_kv_cache(executor: Executor, config: EngineConfig) -> EngineConfig:
    """`config` with its KV block count: as given, or what every rank can hold after its weights (the ranks
    allocate their caches here)."""
    if config.cache.num_kv_blocks is not None:
        return config
    with shutdown_on_failure(executor):
        blocks = executor.initialize_kv_cache()
    return replace(config, cache=replace(config.cache, num_kv_blocks=blocks))


def set_eplb_slot_bytes(executor: Executor, eplb: EPLBController | None) -> None:
    """At start-up, not at the first move: the ranks' slot sizes (the staging budget's unit). A layer holding a
    tensor a move could not carry refuses EPLB here (moe/expert_move.py slot_bytes), as does a staging budget no
    expert fits in."""
    if eplb is None:
        return
    with shutdown_on_failure(executor):
        eplb.set_slot_bytes(executor.collective(RankCall.EPLB_SLOT_BYTES)[0])


def warm_up_ranks(executor: Executor, config: EngineConfig) -> list[WarmupReport] | None:
    """Warm every rank (engine/rank/warmup.py, a collective) unless `config.skip_warmup`, once the KV cache is in
    place: the kernels steps hit compile before serving. Logs the total; rank 0's report first."""
    if config.skip_warmup:
        logger.info("warm-up skipped (--skip-warmup): the first requests compile the kernels they hit")
        return None
    t0 = time.perf_counter()
    with shutdown_on_failure(executor):
        reports = executor.warm_up(WarmupConfig(config.scheduler.max_num_batched_tokens,
                                                config.scheduler.max_num_seqs))
    first = reports[0]
    logger.info("warm-up: %d kernel variants in %.1f s (%s)", first.num_variants, time.perf_counter() - t0,
                ", ".join(f"{name} {n} in {s:.1f} s" for name, n, s in first.phases))
    return reports
