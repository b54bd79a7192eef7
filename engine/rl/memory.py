"""Memory back to the trainer (docs/rl.md): vLLM's `sleep(level)` / `wake_up(tags)`, SGLang's
`release_memory_occupation` / `resume_memory_occupation`. `MemoryControl` is held by the engine's RL control
(`engine.rl.memory`, engine/rl/control.py). Every rank releases its part (engine/rl/rank/sleep_mode.py) through the
executor's typed rank calls; while any part is released the engine refuses requests, naming why.

Level 1 keeps the weights in host memory and frees the KV cache; level 2 drops the weights too: they come back with
the next update (which gives each rank's weights their bytes first), and until an update has written every served
tensor the engine refuses requests (engine/rl/stale.py). The KV cache's contents are lost either way: the prefix
cache is flushed at sleep.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from ..contract.worker_api import RankCall
from .errors import NotServing, check_enabled

if TYPE_CHECKING:
    from .host import RLHost
    from .stale import StaleWeights

SLEEP_LEVELS = (1, 2)
MEMORY_TAGS = ("weights", "kv_cache")


class MemoryControl:
    """sleep / wake_up of an engine (`host`): `stale` is the RL control's record of tensors to write (level 2 adds
    every served one), `flush_cache` its prefix-cache flush."""

    def __init__(self, host: RLHost, stale: StaleWeights, flush_cache: Callable[[], int]) -> None:
        self._host = host
        self._stale = stale
        self._flush_cache = flush_cache
        # The parts every rank has given back ("weights", "kv_cache"); empty: awake. Read by the admission check.
        self.released: tuple[str, ...] = ()
        self._sleep_level = 0

    @property
    def sleep_level(self) -> int:
        """0 while awake, else the level of the sleep the engine is in (1: weights on the host, 2: dropped)."""
        return self._sleep_level if self.released else 0

    def sleep(self, level: int = 1) -> dict:
        """Give the devices back: level 1 the weights to host memory and the KV cache freed, level 2 the weights
        dropped too (an update fills them again). Refused while requests run. {"bytes_freed", "seconds", "level"}."""
        from .weights import served_names

        host = self._host
        check_enabled(host.config, "sleep")
        if isinstance(level, bool) or level not in SLEEP_LEVELS:
            raise ValueError(f"level={level!r} is invalid: choose from {', '.join(map(str, SLEEP_LEVELS))}.")
        if self.released:
            raise ValueError(f"sleep(level={level}) is refused: the engine is asleep already (level "
                             f"{self._sleep_level}; {', '.join(self.released)} released): wake_up first.")
        if host.has_unfinished_requests():
            raise ValueError("sleep is refused while requests run: let them finish, or pause_generation('abort').")
        t0 = time.perf_counter()
        host.drain_for_update()
        freed = host.executor.collective(RankCall.SLEEP, level)
        self._flush_cache()  # the KV cache's contents are gone
        self.released, self._sleep_level = MEMORY_TAGS, level
        if level == 2:
            self._stale.add(served_names(host.config.model, host.config.model.model),
                            "the weights were dropped by sleep(level=2)")
        return {"bytes_freed": sum(freed), "seconds": time.perf_counter() - t0, "level": level}

    def wake_up(self, tags=None) -> dict:
        """Give the released parts back (`tags`: "weights", "kv_cache"; None: both): the weights from their host copy
        at level 1 (at level 2 from the update that must come), the KV cache empty. {"bytes", "seconds",
        "graphs_recaptured"}."""
        check_enabled(self._host.config, "wake_up")
        tags = MEMORY_TAGS if tags is None else tuple(tags)
        for tag in tags:
            if tag not in MEMORY_TAGS:
                raise ValueError(f"tags={list(tags)!r} is invalid: each tag is one of {', '.join(MEMORY_TAGS)}.")
        infos = self._host.executor.collective(RankCall.WAKE_UP, tags)
        self.released = tuple(t for t in self.released if t not in tags)
        return {"bytes": sum(i["bytes"] for i in infos), "seconds": max(i["seconds"] for i in infos),
                "graphs_recaptured": any(i["graphs_recaptured"] for i in infos)}

    def is_sleeping(self) -> bool:
        """Whether any part is released (vLLM's is_sleeping): read-only, taken without enable_weight_updates."""
        return bool(self.released)

    def release_memory_occupation(self, tags=None) -> dict:
        """SGLang's name: sleep(level=1) (the weights kept in host memory, the KV cache freed)."""
        if tags is not None:
            raise ValueError(f"tags={tags!r} is invalid: release_memory_occupation releases weights and KV cache "
                             "together (tags=None); wake them back one at a time with resume_memory_occupation.")
        return self.sleep(1)

    def resume_memory_occupation(self, tags=None) -> dict:
        """SGLang's name for wake_up."""
        return self.wake_up(tags)

    def weights_written(self) -> None:
        """An update gave every rank's weights their bytes back (engine/rl/rank/worker.RLWorker._write_weights)."""
        self.released = tuple(t for t in self.released if t != "weights")

    def check_awake(self) -> None:
        if self.released:
            raise NotServing(f"requests are refused: the engine is asleep (sleep(level={self._sleep_level}); "
                             f"{', '.join(self.released)} released): wake_up first.")
