"""The KV offload connector (issue 47 item 2, first storey): a request's prompt blocks are written through to the
offload tiers (engine/kv_transfer/offload_tiers.py: host memory, then disk) once its prefill step has run, and a
fresh request whose leading blocks the device prefix cache no longer holds, but a tier does, loads them back
before its prefill step instead of recomputing them.

    tiers = OffloadTiers(OffloadConfig(host_bytes=8 << 30, disk_bytes=64 << 30, disk_dir="/local/kv"))
    llm = LLM(model, kv_connector=OffloadKVConnector(tiers))

Through the KV connector seam (scheduler/kv_connector.py): the scheduler half reports as loadable the leading
full blocks a tier holds (`num_loadable_tokens`; the scheduler loads only when that is more than its prefix hit,
and the loaded blocks join the prefix cache as computed ones), saves every request (`wants_save`); the worker half
copies the blocks out after the prefill step (`PagedKVBlocks.read`: on a GPU a blocking copy to host memory) and
writes them back before the loading request's step. Keys are the chained hash of the prompt's tokens per block
(`block_keys`), so any request with the same prefix hits.

Not yet (named): saves are write-through at prefill, not the device pool's evictions; loads run synchronously in
the rank's step (host memory: a copy; disk: a file read) rather than on a thread; a model whose cache has
sliding-window or per-sequence state groups saves nothing (each needs its own key rule); one process only (the
tiers are shared by both halves in memory, like the in-host reference); the scheduler's ask hashes the prompt's
blocks each time it asks.
"""
from __future__ import annotations

import logging
import threading

import torch

from moelink.scheduler.outputs import KVTransfer
from moelink.scheduler.request import Request

from .blocks import FULL, PagedKVBlocks, SavedKV
from .offload_tiers import OffloadConfig, OffloadTiers, block_keys

logger = logging.getLogger(__name__)


class OffloadKVConnector:
    """The factory (engine/contract/kv_connector.py) over one `OffloadTiers`, shared by both halves."""

    def __init__(self, tiers: OffloadTiers) -> None:
        self.tiers = tiers
        self.block_size: int | None = None  # learnt from the rank's cache at its first save (the worker half)

    def scheduler_side(self, rank: int) -> "_SchedulerSide":
        return _SchedulerSide(self)

    def worker_side(self, rank: int) -> "_WorkerSide":
        return _WorkerSide(self)

    def __reduce__(self):
        raise TypeError("OffloadKVConnector works inside one process (the in-process executor, "
                        "expert_parallel_size=1): its tiers cannot be shared with Ray workers.")

    def __deepcopy__(self, memo) -> "OffloadKVConnector":
        return self


class _SchedulerSide:
    def __init__(self, owner: OffloadKVConnector) -> None:
        self.owner = owner

    def num_loadable_tokens(self, req: Request) -> int:
        bs = self.owner.block_size
        if bs is None:
            return 0  # nothing saved yet
        return self.owner.tiers.num_leading(block_keys(req.prompt_token_ids, bs)) * bs

    def wants_save(self, req: Request) -> bool:
        return True

    def load_params(self, req: Request) -> tuple[int, ...]:
        return tuple(req.prompt_token_ids)  # the worker half keys the blocks by them

    def transfer_done(self, transfer: KVTransfer, ok: bool) -> None:
        pass


class _WorkerSide:
    def __init__(self, owner: OffloadKVConnector) -> None:
        self.owner, self.tiers = owner, owner.tiers
        self._lock = threading.Lock()
        self._done: dict[int, bool] = {}
        self._refused = False

    def _report(self, t: KVTransfer, ok: bool) -> None:
        with self._lock:
            self._done[t.transfer_id] = ok

    def _usable(self, kv: PagedKVBlocks) -> bool:
        if any(kind != FULL for _, kind in kv.groups):
            if not self._refused:
                logger.warning("KV offload: this model's cache has sliding-window or per-sequence state groups; "
                               "nothing is offloaded (its blocks are recomputed)")
                self._refused = True
            return False
        return True

    def start_save(self, t: KVTransfer, kv: PagedKVBlocks) -> None:
        if self._usable(kv):
            self.owner.block_size = kv.block_size
            if self.tiers.layout is None:
                self.tiers.layout = kv.layout
            keys = block_keys(t.token_ids, kv.block_size)
            saved = kv.read(t)  # device-to-host copy: blocking on a GPU
            # Every group is read with the request's one table (FULL): the same entries, in the same order.
            for j, i in enumerate(saved.groups[0][0] if saved.groups else []):
                if i < len(keys):  # full blocks only: a partial one has no key
                    self.tiers.put(keys[i], tuple(tuple(r[j:j + 1].clone() for r in rows) for _, rows in saved.groups))
        self._report(t, True)  # the blocks are free to go either way

    def start_load(self, t: KVTransfer, kv: PagedKVBlocks) -> None:
        try:
            if not self._usable(kv) or self.tiers.layout != kv.layout:
                raise ValueError("the offload tiers hold another cache layout")
            keys = block_keys(t.params, kv.block_size)
            first, last = t.first_block, -(-t.num_tokens // kv.block_size)
            blocks = []
            for i in range(first, last):
                rows = self.tiers.get(keys[i]) if i < len(keys) else None
                if rows is None:
                    raise ValueError(f"block {i} of request {t.req_id!r} left the offload tiers")
                blocks.append(rows)
            idx = list(range(first, last))
            groups = [(idx, tuple(torch.cat([b[g][j] for b in blocks]) for j in range(len(blocks[0][g]))))
                      for g in range(len(kv.groups))] if blocks else [(idx, ())] * len(kv.groups)
            if blocks:
                kv.write(t, SavedKV(t.num_tokens, (), kv.layout, groups))
        except ValueError as exc:
            logger.warning("KV offload load failed (the request is recomputed): %s", exc)
            self._report(t, False)
            return
        self._report(t, True)

    def poll(self) -> dict[int, bool] | None:
        with self._lock:
            done, self._done = self._done, {}
        return done or None

    def drop_pending(self) -> None:
        with self._lock:
            self._done = {}

    def close(self) -> None:
        pass  # the tiers belong to whoever made them


__all__ = ["OffloadConfig", "OffloadKVConnector", "OffloadTiers"]
