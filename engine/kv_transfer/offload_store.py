"""The KV offload tiers' bytes on one rank (the worker half of engine/kv_transfer/offload.py; the scheduler's
engine/kv_transfer/offload_tiers.py decides which slot holds what): host memory and one disk file, both
allocated once, when the rank's first tier work arrives, and sized by the flags in whole blocks.

A slot holds one block of every cache tensor of the rank: per tensor a host buffer uint8 [S, R_j] (S slots, R_j
that tensor's bytes per block: B tokens x its row), pinned on CUDA so copies to and from the device do not stage,
plain on CPU. The disk tier is one file of D slots of `block_bytes` each (the tensors' rows one after another),
read and written with pread/pwrite at the slot's offset: no pickle, no file per block. The file is created 0600
in the directory (made 0700) and deleted when the rank closes: the tiers are a cache of this process.

A model whose sliding-window and full-attention layers share cache tensors (gpt-oss: PagedKVBlocks' FULL and
SLIDING groups over the same tensors) hands each block id to one table at a time, so a slot holds one block's row
of each *distinct* tensor (`unique_tensors`), whichever table the block was in; the scheduler keys the two apart
(a sliding block under the pool's tagged hash) and `load` writes the full table's slots and the sliding table's
each into their own table's entries. A per-sequence state's group (linear attention) is refused
(`check_offloadable`): a state is not a block.

Legend: N blocks, S host slots, D disk slots, R bytes of one tensor per block.
"""
from __future__ import annotations

import os

import torch

from moelink.scheduler.outputs import KVTransfer

from .blocks import SLIDING, STATE, PagedKVBlocks, wide_dtype
from .offload_tiers import LoadPlan, OffloadConfig


def check_offloadable(kv: PagedKVBlocks) -> None:
    """ValueError unless every group of the rank's cache is paged KV (full or sliding table; module docstring)."""
    if any(kind == STATE for _, kind in kv.groups):
        raise ValueError("KV offload cannot serve this model: its cache has per-sequence state groups (linear "
                         "attention), which are not blocks the offload tiers key.")


def unique_tensors(kv: PagedKVBlocks) -> list[torch.Tensor]:
    """The rank's cache tensors, each once (a sliding and a full group may share them), in group order."""
    seen, out = set(), []
    for ts, _ in kv.groups:
        for x in ts:
            if id(x) not in seen:
                seen.add(id(x))
                out.append(x)
    return out


def block_bytes_of(kv: PagedKVBlocks) -> int:
    """Bytes of one block across the rank's distinct cache tensors."""
    return sum(x[0].numel() * x.element_size() for x in unique_tensors(kv))


class TierStore:
    """One rank's host slots and disk file (module docstring)."""

    def __init__(self, kv: PagedKVBlocks, config: OffloadConfig, rank: int) -> None:
        check_offloadable(kv)
        self.tensors = unique_tensors(kv)
        self._index = {id(x): j for j, x in enumerate(self.tensors)}  # a tensor -> its host buffer
        self.row_bytes = [x[0].numel() * x.element_size() for x in self.tensors]
        self.block_bytes = sum(self.row_bytes)
        self.num_host, self.num_disk = config.num_slots(self.block_bytes)
        pin = kv.device.type == "cuda"
        # Allocated once: every slot of the tier (a CPU tensor is not touched until written).
        self.host_SR = [torch.empty((self.num_host, r), dtype=torch.uint8, pin_memory=pin) for r in self.row_bytes]
        self._stage: dict[tuple[str, int], torch.Tensor] = {}  # gathers of scattered slots (_staging)
        self.path, self._fd = None, -1
        if self.num_disk:
            os.makedirs(config.disk_dir, mode=0o700, exist_ok=True)
            self.path = os.path.join(config.disk_dir, f"moelink-kv-{os.getpid()}-rank{rank}.bin")
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, self.num_disk * self.block_bytes)  # sparse: disk is used as slots fill

    def _slot_views(self, s: int):
        """Slot s's bytes per tensor, as numpy views (for pread/pwrite)."""
        return [buf[s].numpy() for buf in self.host_SR]

    def demote(self, pairs) -> None:
        """Host slot -> disk slot, for each (host slot, disk slot)."""
        for s, d in pairs:
            os.pwritev(self._fd, self._slot_views(s), d * self.block_bytes)

    def promote(self, pairs) -> None:
        """Disk slot -> host slot, for each (disk slot, host slot)."""
        for d, s in pairs:
            n = os.preadv(self._fd, self._slot_views(s), d * self.block_bytes)
            if n != self.block_bytes:
                raise OSError(f"KV offload: disk slot {d} gave {n} of {self.block_bytes} bytes")

    def _rows(self, j: int, slots, way: str = "in") -> torch.Tensor:
        """Tensor j's bytes of host slots `slots` as one uint8 [N, R] tensor: the slots themselves when they are
        consecutive (the free list hands them out in order), else gathered into a staging buffer kept between
        calls (a fresh tensor per call would page-fault its whole size on a CPU)."""
        n, s0 = len(slots), slots[0]
        if list(slots) == list(range(s0, s0 + n)):
            return self.host_SR[j][s0:s0 + n]
        out = self._staging(way, j, n)
        torch.index_select(self.host_SR[j], 0, torch.tensor(list(slots), dtype=torch.long), out=out)
        return out

    def save(self, kv: PagedKVBlocks, blocks, slots) -> None:
        """Device blocks `blocks` -> host slots `slots`, before the step's forward overwrites the blocks."""
        if not blocks:
            return
        if kv.device.type == "cuda":
            # Device-to-host sync: a blocking copy (the step's forward must not overwrite the blocks first).
            ids_N = torch.tensor(list(blocks), dtype=torch.long, device=kv.device)
            slots_N = torch.tensor(list(slots), dtype=torch.long)
            for buf, x in zip(self.host_SR, self.tensors):
                u8 = x.view(torch.uint8)
                r = u8.view(wide_dtype(u8)).index_select(0, ids_N).view(torch.uint8).to("cpu")
                buf.index_copy_(0, slots_N, r.reshape(len(blocks), -1))
            return
        ids_N = torch.tensor(list(blocks), dtype=torch.long)
        s0 = slots[0]
        direct = list(slots) == list(range(s0, s0 + len(slots)))
        slots_N = None if direct else torch.tensor(list(slots), dtype=torch.long)
        for j, x in enumerate(self.tensors):
            u8 = x.view(torch.uint8)
            dt = wide_dtype(u8)
            n = len(blocks)
            out = self.host_SR[j][s0:s0 + n] if direct else self._staging("out", j, n)
            torch.index_select(u8.view(dt), 0, ids_N, out=out.view(dt).view(n, *u8.view(dt).shape[1:]))
            if not direct:
                self.host_SR[j].index_copy_(0, slots_N, out)

    def _staging(self, way: str, j: int, n: int) -> torch.Tensor:
        """A uint8 [n, R_j] buffer kept between calls, one per use ("in" / "in-sliding": the loader thread's, "out":
        the step's saves): they run at the same time."""
        stage = self._stage.get((way, j))
        if stage is None or stage.shape[0] < n:
            stage = self._stage[way, j] = torch.empty((max(n, 64), self.row_bytes[j]), dtype=torch.uint8,
                                                      pin_memory=self.host_SR[j].is_pinned())
        return stage[:n]

    def load(self, kv: PagedKVBlocks, t: KVTransfer, p: LoadPlan) -> None:
        """The plan's host slots -> the request's full-table entries from `t.first_block` on, then its sliding
        table's from `p.sliding_first` on (LoadPlan; the copy is enqueued on the current stream: the caller's side
        stream on CUDA)."""
        n_full = p.num_full_blocks
        # A tensor shared by both tables is read once per table: each part gathers into its own staging buffer
        # (on CUDA the first part's copy may still be reading its buffer).
        parts = {SLIDING: (p.host_slots[n_full:], p.sliding_first, "in-sliding")}
        full = (p.host_slots[:n_full], t.first_block, "in")
        for g, (tensors, kind) in enumerate(kv.groups):
            slots, first, way = parts.get(kind, full)
            if not slots:
                continue
            idx = list(range(first, first + len(slots)))
            rows = tuple(self._rows(self._index[id(x)], slots, way).view(len(slots), *x.view(torch.uint8).shape[1:])
                         for x in tensors)
            kv.write_group(g, t, idx, rows)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.host_SR = []


__all__ = ["TierStore", "block_bytes_of", "check_offloadable"]
