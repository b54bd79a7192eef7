"""The KV offload tiers' bytes on one rank (the worker half of engine/kv_transfer/offload.py; the scheduler's
engine/kv_transfer/offload_tiers.py decides which slot holds what): host memory and one disk file, both
allocated once, when the rank's first tier work arrives, and sized by the flags in whole blocks.

A slot holds one block of every cache tensor of the rank: per tensor a host buffer uint8 [S, R_j] (S slots, R_j
that tensor's bytes per block: B tokens x its row), pinned on CUDA so copies to and from the device do not stage,
plain on CPU. The disk tier is one file of D slots of `block_bytes` each (the tensors' rows one after another),
read and written with pread/pwrite at the slot's offset: no pickle, no file per block. Every write's length is
checked (a short one continued while it makes progress: a filling disk writes part of a slot with no error), and a
slot whose write failed is never read back; a short read fails its load. The file is created 0600 in the directory
(made 0700) and unlinked at once, the descriptor kept: its blocks are freed when the rank closes it or dies (a
killed Ray actor leaves no file): the tiers are a cache of this process.

A model whose sliding-window and full-attention layers share cache tensors (gpt-oss: PagedKVBlocks' FULL and
SLIDING groups over the same tensors) hands each block id to one table at a time, so a slot holds one block's row
of each *distinct* tensor (`unique_tensors`), whichever table the block was in; the scheduler keys the two apart
(a sliding block under the pool's tagged hash) and `load` writes the full table's slots and the sliding table's
each into their own table's entries. A linear-attention model's state pools (PagedKVBlocks' STATE groups) get
host slots of their own, one slot's state of every pool each (`state_SR`, sized by
`OffloadConfig.num_state_slots`, never pushed to disk): a state checkpoint the device is about to lose with its
block is copied into one, and a load writes it into the request's state slot.

Legend: N blocks, S host slots, D disk slots, R bytes of one tensor per block.
"""
from __future__ import annotations

import errno
import os
import tempfile

import torch

from moelink.scheduler.outputs import KVTransfer

from ..contract.kv_blocks import SLIDING, STATE, PagedKVBlocks, wide_dtype
from .offload_tiers import LoadPlan, OffloadConfig


def write_all(fd: int, views, offset: int) -> None:
    """pwritev every byte of `views` (1-D uint8 arrays) at `offset`. A write may put down fewer bytes than asked with
    no error (a filling disk, a signal): the rest is written from where it stopped while each call makes progress;
    an OSError (ENOSPC) or a call that writes nothing raises OSError, and the caller must not read the slot back."""
    want = sum(v.nbytes for v in views)
    done = 0
    while done < want:
        n = os.pwritev(fd, _after(views, done), offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "a write made no progress")
        done += n


def _after(views, k: int) -> list:
    """`views` from byte k on (the buffers a short write left unwritten)."""
    out = []
    for v in views:
        if k >= v.nbytes:
            k -= v.nbytes
            continue
        out.append(v[k:] if k else v)
        k = 0
    return out


def unique_tensors(kv: PagedKVBlocks) -> list[torch.Tensor]:
    """The rank's paged cache tensors, each once (a sliding and a full group may share them), in group order."""
    seen, out = set(), []
    for ts, kind in kv.groups:
        for x in ts if kind != STATE else ():
            if id(x) not in seen:
                seen.add(id(x))
                out.append(x)
    return out


def block_bytes_of(kv: PagedKVBlocks) -> int:
    """Bytes of one block across the rank's distinct cache tensors."""
    return sum(x[0].numel() * x.element_size() for x in unique_tensors(kv))


def state_tensors(kv: PagedKVBlocks) -> list[torch.Tensor]:
    """The linear-attention layers' state pools (one row per slot), in group order."""
    return [x for ts, kind in kv.groups if kind == STATE for x in ts]


def state_bytes_of(kv: PagedKVBlocks) -> int:
    """Bytes of one slot's state across the rank's state pools (0: no linear-attention layers)."""
    return sum(x[0].numel() * x.element_size() for x in state_tensors(kv))


class TierStore:
    """One rank's host slots and disk file (module docstring)."""

    def __init__(self, kv: PagedKVBlocks, config: OffloadConfig, rank: int) -> None:
        config.check_machine()  # this rank's machine (the driver that checked the flags may be another one)
        self.tensors = unique_tensors(kv)
        self._index = {id(x): j for j, x in enumerate(self.tensors)}  # a tensor -> its host buffer
        self.row_bytes = [x[0].numel() * x.element_size() for x in self.tensors]
        self.block_bytes = sum(self.row_bytes)
        self.states = state_tensors(kv)
        self.state_bytes = state_bytes_of(kv)
        self.num_state = config.num_state_slots(self.state_bytes)
        self.num_host, self.num_disk = config.block_host_bytes(self.state_bytes).num_slots(self.block_bytes)
        pin = kv.device.type == "cuda"
        # Allocated once: every slot of the tier (a CPU tensor is not touched until written).
        self.host_SR = [torch.empty((self.num_host, r), dtype=torch.uint8, pin_memory=pin) for r in self.row_bytes]
        # State slots [num_state, one slot's state of each pool] (linear attention; host only, never on disk).
        self.state_SR = [torch.empty((self.num_state, x[0].numel() * x.element_size()), dtype=torch.uint8,
                                     pin_memory=pin) for x in self.states]
        self._stage: dict[tuple[str, int], torch.Tensor] = {}  # gathers of scattered slots (_staging)
        self.path, self._fd, self.disk_dir = None, -1, config.disk_dir
        self._bad_disk: set[int] = set()  # disk slots whose last push-down failed: never read (`demote`)
        if self.num_disk:
            os.makedirs(config.disk_dir, mode=0o700, exist_ok=True)
            # A fresh name (mkstemp: 0600, never an existing file, whatever an earlier process left there), unlinked
            # at once and kept open: the file's blocks live as long as this process holds the descriptor, so a rank
            # that is killed (Ray's shutdown kills its actors; SIGKILL, a crash) leaves no file behind.
            self._fd, self.path = tempfile.mkstemp(prefix=f"moelink-kv-rank{rank}-", suffix=".bin",
                                                   dir=config.disk_dir)
            try:
                os.unlink(self.path)
                os.ftruncate(self._fd, self.num_disk * self.block_bytes)  # sparse: disk is used as slots fill
            except OSError:
                os.close(self._fd)
                self._fd = -1
                raise

    def _slot_views(self, s: int):
        """Slot s's bytes per tensor, as numpy views (for pread/pwrite)."""
        return [buf[s].numpy() for buf in self.host_SR]

    def demote(self, pairs) -> None:
        """Host slot -> disk slot, for each (host slot, disk slot). Every pair is tried; a disk slot whose write
        failed is marked bad (its bytes are part this block, part whatever was there), so `promote` refuses it even
        before the scheduler hears of the failure, and the first failure is raised: the step's tier work is
        reported failed and the scheduler drops its blocks. A slot written whole again is good again."""
        failed = None
        for s, d in pairs:
            try:
                write_all(self._fd, self._slot_views(s), d * self.block_bytes)
            except OSError as exc:
                self._bad_disk.add(d)
                failed = failed or OSError(exc.errno, f"a push-down to the disk tier under {self.disk_dir} failed: "
                                                      f"{exc.strerror or exc}")
            else:
                self._bad_disk.discard(d)
        if failed is not None:
            raise failed

    def promote(self, pairs) -> None:
        """Disk slot -> host slot, for each (disk slot, host slot); OSError on a slot whose write failed or a read
        that comes back short (the load fails and its request is recomputed: never a part-written block)."""
        for d, s in pairs:
            if d in self._bad_disk:
                raise OSError(errno.EIO, "a load read a disk slot whose push-down failed")
            n = os.preadv(self._fd, self._slot_views(s), d * self.block_bytes)
            if n != self.block_bytes:
                raise OSError(errno.EIO, "a disk slot's read came back short")  # one line per cause: logged once

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

    def save_states(self, pairs) -> None:
        """Device state checkpoint slot -> host state slot, for each (checkpoint slot, host state slot), before the
        step's forward (a checkpoint is written only after a forward, and only into a slot no prefix names)."""
        for c, s in pairs:
            for buf, x in zip(self.state_SR, self.states):
                buf[s].copy_(x[c].reshape(-1).view(torch.uint8))  # a blocking copy on CUDA (device-to-host sync)

    def load_state(self, kv: PagedKVBlocks, t: KVTransfer, s: int) -> None:
        """Host state slot `s` -> the request's state slot (`t.state_slot`)."""
        j = 0
        for g, (tensors, kind) in enumerate(kv.groups):
            if kind != STATE:
                continue
            rows = tuple(self.state_SR[j + i][s:s + 1].view(1, *x.view(torch.uint8).shape[1:])
                         for i, x in enumerate(tensors))
            j += len(tensors)
            kv.write_group(g, t, [0], rows)

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
        if p.state_slot >= 0:
            self.load_state(kv, t, p.state_slot)
        for g, (tensors, kind) in enumerate(kv.groups):
            slots, first, way = parts.get(kind, full)
            if not slots or kind == STATE:
                continue
            idx = list(range(first, first + len(slots)))
            rows = tuple(self._rows(self._index[id(x)], slots, way).view(len(slots), *x.view(torch.uint8).shape[1:])
                         for x in tensors)
            kv.write_group(g, t, idx, rows)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # the file was unlinked at its creation: its blocks go with the descriptor
            self._fd = -1
        self.host_SR, self.state_SR = [], []


__all__ = ["TierStore", "block_bytes_of", "state_bytes_of", "unique_tensors"]
