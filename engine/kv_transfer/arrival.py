"""A decode rank's load, written into its KV blocks group by group as the bytes arrive (the remote connector's
fetch thread, engine/kv_transfer/remote.py).

Each group (a layer's cache tensors with one block table, engine/contract/kv_blocks.py) is written as soon as the
transport has it (`wire.recv_saved`'s `on_group`), while the next one is still on the wire: the load is
pipelined layer by layer and no copy of the whole prompt's KV is held on the decode side. The blocks are the
request's alone (the scheduler reserved them and no step reads them before the load is reported), so writing
them from this thread while the rank steps other requests is safe; on a GPU the copies go on the writer's own
stream and `done()` (an event query, no sync) says when the last has landed. Nothing is written once the rank
dropped its loads (an elastic rewind, `RemoteWorkerSide.drop_pending`): the writer checks the generation under the
side's write lock before each group, and `fence()` makes the rank's stream wait for what was enqueued before.

A transport that READs straight into the blocks (NIXL in place, engine/kv_transfer/nixl_inplace.py) writes nothing
through the writer: it checks the generation before posting its READs (`in_place()`, which also marks them in
flight), reports each group as its READ lands (`landed`), and says when none is in flight any more (`in_place_done`);
`fence()` waits for that, so a dropped load's blocks are not handed on while a READ may still write them.
"""
from __future__ import annotations

import threading

import torch

from moelink.scheduler.outputs import KVTransfer

from ..contract.kv_blocks import PagedKVBlocks


_READS_WAIT_S = 300.0  # a bound on fence()'s wait; a fetch's READs end within fetch_timeout_s (60 s by default)


class LoadDropped(Exception):
    """The rank dropped this load while it arrived (not a fetch failure: the scheduler awaits no report)."""


class LoadWriteFailed(Exception):
    """A group that arrived could not be written here (a copy that does not fit): the load failed."""


class ArrivalWriter:
    """`on_group` of one load (module docstring). `current` returns the side's generation; `lock` is the side's
    write lock (held by `drop_pending` while it bumps the generation)."""

    def __init__(self, t: KVTransfer, kv: PagedKVBlocks, generation: int, current, lock: threading.Lock) -> None:
        self.t, self.kv, self.generation, self._current, self._lock = t, kv, generation, current, lock
        self.nbytes = 0
        # (offset, count) of this rank's kv heads the fetch under way carries (a prefill TP rank's shard,
        # engine/kv_transfer/tp_shard.py); None: the rows hold every head of this cache.
        self.heads: tuple[int, int] | None = None
        self._cuda = kv.device.type == "cuda"
        self._stream = torch.cuda.Stream(kv.device) if self._cuda else None
        self._event: torch.cuda.Event | None = None  # CUDA: recorded after the latest group's copies
        self._reads_idle = threading.Event()  # no in-place READ in flight (set, but while a transport's are)
        self._reads_idle.set()

    def __call__(self, g: int, idx: list[int], rows: tuple[torch.Tensor, ...]) -> None:
        with self._lock:
            if self.generation != self._current():
                raise LoadDropped()
            try:
                with torch.inference_mode():
                    if self._cuda:
                        # After whatever this thread's stream did to the rows (an NCCL receive waits there).
                        self._stream.wait_stream(torch.cuda.current_stream(self.kv.device))
                        with torch.cuda.stream(self._stream):
                            self.kv.write_group(g, self.t, idx, rows, self.heads)
                            self._event = torch.cuda.Event()
                            self._event.record(self._stream)
                        if not rows[0].is_cuda:
                            # Host sync, on the fetch thread only: the transport reuses this host memory for the
                            # next group (wire.Staging), so its copy must have left it.
                            self._event.synchronize()
                    else:
                        self.kv.write_group(g, self.t, idx, rows, self.heads)
            except (ValueError, RuntimeError) as exc:
                raise LoadWriteFailed(str(exc)) from None
        self.nbytes += sum(r.numel() for r in rows)

    def in_place(self) -> None:
        """In-place READs are about to be posted into the blocks (module docstring); LoadDropped if dropped."""
        with self._lock:
            if self.generation != self._current():
                raise LoadDropped()
            self._reads_idle.clear()

    def in_place_done(self) -> None:
        """Every in-place READ has completed or was released (aborted)."""
        self._reads_idle.set()

    def landed(self, g: int, nbytes: int) -> None:
        """Group g's READ into the blocks completed (`nbytes` of them); LoadDropped if the load was dropped."""
        with self._lock:
            if self.generation != self._current():
                raise LoadDropped()
        self.nbytes += nbytes

    def done(self) -> bool:
        """Every group written (on a GPU: landed)."""
        return self._event is None or self._event.query()

    def fence(self) -> None:
        """Make the rank's current stream wait for the copies enqueued so far, and the host for in-place READs still
        in flight (each ends within its fetch's deadline), before the blocks are reused."""
        self._reads_idle.wait(_READS_WAIT_S)
        if self._event is not None:
            torch.cuda.current_stream(self.kv.device).wait_event(self._event)


__all__ = ["ArrivalWriter", "LoadDropped", "LoadWriteFailed"]
