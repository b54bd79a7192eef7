"""The KV offload tiers (issue 47 item 2): prefix-cache blocks kept below device memory, in host memory and then in
files under a directory, each tier an LRU bounded in bytes. A block is keyed by the chained hash of the prompt's
tokens up to its end (`block_keys`: the same prefix, the same key, whichever request computed it); its value is
its rows of every cache tensor (uint8 [1, B, X] per tensor per group, `PagedKVBlocks` rows), so a load writes them
back with `PagedKVBlocks.write`.

A block pushed out of host memory goes to disk (when a directory is given), one file per block, raw bytes (no
pickle); a block pushed out of disk is deleted. A hit in either tier moves the block to the front of host memory.
`TierStats` counts hits, bytes and load time per tier. Thread-safe: the scheduler thread asks what is there, the
rank's device work saves and loads.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

Rows = tuple[tuple[torch.Tensor, ...], ...]  # per group, per tensor: uint8 [1, B, X]


def block_keys(token_ids, block_size: int) -> list[str]:
    """One key per full block of `token_ids`: sha256 chained over the blocks' int32 token bytes (hex)."""
    keys, h = [], b""
    ids = np.asarray(token_ids, dtype=np.int64).astype("<i4")
    for b in range(len(ids) // block_size):
        h = hashlib.sha256(h + ids[b * block_size:(b + 1) * block_size].tobytes()).digest()
        keys.append(h.hex())
    return keys


@dataclass
class TierStats:
    """Per tier: blocks stored, found, loaded back (with their bytes and seconds), pushed down or dropped."""

    stored: int = 0
    hits: int = 0
    loaded_bytes: int = 0
    load_s: float = 0.0
    evicted: int = 0


@dataclass(frozen=True)
class OffloadConfig:
    """`host_bytes`: the host tier's bound (> 0); `disk_bytes` and `disk_dir`: the disk tier's (0 / None: none)."""

    host_bytes: int = 4 << 30
    disk_bytes: int = 0
    disk_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host_bytes, int) or isinstance(self.host_bytes, bool) or self.host_bytes < 1:
            raise ValueError(f"OffloadConfig.host_bytes={self.host_bytes!r} must be an integer >= 1 (bytes)")
        if not isinstance(self.disk_bytes, int) or isinstance(self.disk_bytes, bool) or self.disk_bytes < 0:
            raise ValueError(f"OffloadConfig.disk_bytes={self.disk_bytes!r} must be an integer >= 0 (bytes)")
        if self.disk_bytes and not self.disk_dir:
            raise ValueError("OffloadConfig.disk_dir must name a directory when disk_bytes > 0")


def _nbytes(rows: Rows) -> int:
    return sum(t.numel() for ts in rows for t in ts)


class OffloadTiers:
    """Host memory, then disk (module docstring)."""

    def __init__(self, config: OffloadConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._host: OrderedDict[str, Rows] = OrderedDict()  # least recently used first
        self._disk: OrderedDict[str, tuple[str, list[list[tuple[int, ...]]], int]] = OrderedDict()
        self._host_bytes = self._disk_bytes = 0
        self.layout = None  # the cache layout blocks were saved from (PagedKVBlocks.layout), set by the first save
        self.stats = {"host": TierStats(), "disk": TierStats()}
        if config.disk_bytes:
            os.makedirs(config.disk_dir, mode=0o700, exist_ok=True)

    # ------------------------------------------------------------------ what is there (scheduler thread)
    def num_leading(self, keys: list[str]) -> int:
        """How many of `keys`, from the first, either tier holds."""
        with self._lock:
            n = 0
            while n < len(keys) and (keys[n] in self._host or keys[n] in self._disk):
                n += 1
            return n

    # ------------------------------------------------------------------ save / load (rank's device work)
    def put(self, key: str, rows: Rows) -> None:
        with self._lock:
            if key in self._host:
                self._host.move_to_end(key)
                return
            self._host[key] = rows
            self._host_bytes += _nbytes(rows)
            self.stats["host"].stored += 1
            self._shrink_host()

    def get(self, key: str) -> Rows | None:
        """The block's rows from the highest tier holding it (a disk hit is read back and promoted), or None."""
        t0 = time.perf_counter()
        with self._lock:
            rows = self._host.get(key)
            if rows is not None:
                self._host.move_to_end(key)
                st = self.stats["host"]
            else:
                entry = self._disk.pop(key, None)
                if entry is None:
                    return None
                self._disk_bytes -= entry[2]
                rows = _read_file(*entry)
                os.unlink(entry[0])
                st = self.stats["disk"]
                self._host[key] = rows
                self._host_bytes += entry[2]
                self._shrink_host(keep=key)
            st.hits += 1
            st.loaded_bytes += _nbytes(rows)
            st.load_s += time.perf_counter() - t0
            return rows

    def _shrink_host(self, keep: str | None = None) -> None:
        while self._host_bytes > self.config.host_bytes and self._host:
            key = next(iter(self._host))
            if key == keep:
                if len(self._host) == 1:
                    break
                self._host.move_to_end(key)
                continue
            rows = self._host.pop(key)
            n = _nbytes(rows)
            self._host_bytes -= n
            self.stats["host"].evicted += 1
            if self.config.disk_bytes and n <= self.config.disk_bytes:
                path = os.path.join(self.config.disk_dir, key)
                shapes = [[tuple(t.shape) for t in ts] for ts in rows]
                with open(path, "wb") as f:
                    for ts in rows:
                        for t in ts:
                            f.write(t.contiguous().numpy().tobytes())
                self._disk[key] = (path, shapes, n)
                self._disk_bytes += n
                self.stats["disk"].stored += 1
                while self._disk_bytes > self.config.disk_bytes:
                    old, (old_path, _, m) = self._disk.popitem(last=False)
                    os.unlink(old_path)
                    self._disk_bytes -= m
                    self.stats["disk"].evicted += 1

    def held_bytes(self) -> tuple[int, int]:
        with self._lock:
            return self._host_bytes, self._disk_bytes

    def close(self) -> None:
        """Delete the disk tier's files (the tiers are a cache of this process's, not a store to keep)."""
        with self._lock:
            for path, _, _ in self._disk.values():
                try:
                    os.unlink(path)
                except OSError:
                    pass
            self._disk.clear()
            self._host.clear()
            self._host_bytes = self._disk_bytes = 0


def _read_file(path: str, shapes: list[list[tuple[int, ...]]], nbytes: int) -> Rows:
    flat = torch.from_numpy(np.fromfile(path, dtype=np.uint8, count=nbytes))
    out, at = [], 0
    for group in shapes:
        ts = []
        for s in group:
            n = math.prod(s)
            ts.append(flat[at:at + n].view(s))
            at += n
        out.append(tuple(ts))
    return tuple(out)


__all__ = ["OffloadConfig", "OffloadTiers", "TierStats", "block_keys"]
