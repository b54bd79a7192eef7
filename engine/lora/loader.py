"""The driver's background read of adapters' weights, off the step loop: a request naming an adapter not yet in host
memory is held back by the engine (not scheduled, blocking no other request) while a worker thread reads the adapter
(engine/lora/adapter.py `read_adapter`, the same read and checks a rank makes); once read, it is scheduled; a read that
fails ends the requests waiting on it with an error naming the adapter.

Where the weights go: `AdapterLoader` keeps the adapters it read in an LRU of `max_cpu_loras`, and publishes each in
this process's `SHARED` (a weak map, keyed by the checkpoint and the adapter): a rank in this process (the in-process
executor) finds it there when it loads a slot (slots.py `HostAdapters`), so no rank reads the weights on the step
loop. A rank in another process (Ray) reads them itself, from files the driver's read left in the page cache.
"""
from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from ..config.lora import LoRAConfig
from ..contract.lora import LoRARequest
from ..contract.safe_text import MAX_MESSAGE_CHARS, shown
from .adapter import Adapter, ModelTargets, read_adapter

logger = logging.getLogger(__name__)

# (checkpoint directory, lora_int_id, lora_path) -> the adapter the driver read, while anyone holds it (the driver's
# LRU, a rank's HostAdapters): what a rank of this process takes instead of reading the files again.
SHARED: weakref.WeakValueDictionary[tuple[str, int, str], Adapter] = weakref.WeakValueDictionary()


def shared_key(model_dir: str, req: LoRARequest) -> tuple[str, int, str]:
    return (str(model_dir), req.lora_int_id, str(req.lora_path))


class AdapterLoader:
    """Reads adapters on one worker thread; `request` says whether one is in host memory (starting its read when not),
    `poll` which reads ended since. Thread-safe: requests are added on the engine thread, reads end on the worker."""

    def __init__(self, limits: LoRAConfig, targets: ModelTargets, model_dir: str):
        self.limits, self.targets, self.model_dir = limits, targets, str(model_dir)
        self._held: OrderedDict[int, Adapter] = OrderedDict()  # read, least recently used first
        self._reading: dict[int, Future] = {}
        self._ended: list[tuple[LoRARequest, str | None]] = []  # (adapter, error) of reads ended, not yet polled
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moelink-lora-read")

    def request(self, req: LoRARequest) -> bool:
        """True when `req`'s adapter is in host memory (then kept as the most recently used); else its read is
        started (once) and `poll` reports when it ended."""
        with self._lock:
            if req.lora_int_id in self._held:
                self._held.move_to_end(req.lora_int_id)
                return True
            if req.lora_int_id not in self._reading:
                # A read of it that ended unpolled (its requests aborted) says nothing of this one.
                self._ended = [(r, e) for r, e in self._ended if r.lora_int_id != req.lora_int_id]
                self._reading[req.lora_int_id] = self._pool.submit(self._run, req)
            return False

    def _run(self, req: LoRARequest) -> None:
        error = None
        try:
            adapter = read_adapter(req, self.limits, self.targets)
        except Exception as e:  # noqa: BLE001  (any failure ends the requests waiting on it, naming the adapter)
            error = (f"LoRA adapter {shown(req.lora_name)} (lora_path={shown(req.lora_path)}) could not be read: "
                     f"{shown(str(e), MAX_MESSAGE_CHARS, quote=False)}")
            logger.error("%s", error)
        with self._lock:
            self._reading.pop(req.lora_int_id, None)
            if error is None:
                self._held[req.lora_int_id] = adapter
                SHARED[shared_key(self.model_dir, req)] = adapter
                while len(self._held) > self.limits.cpu_loras:
                    self._held.popitem(last=False)
            self._ended.append((req, error))
            self._done.notify_all()

    def poll(self, timeout: float = 0.0) -> list[tuple[LoRARequest, str | None]]:
        """The reads that ended since the last poll, as (adapter, None) or (adapter, the error naming it); waits up to
        `timeout` seconds for one when none has."""
        with self._lock:
            if not self._ended and timeout > 0 and self._reading:
                self._done.wait(timeout)
            ended, self._ended = self._ended, []
        return ended

    def reading(self) -> int:
        with self._lock:
            return len(self._reading)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            self._held.clear()
