"""The worker side of the KV connector seam (scheduler/kv_connector.py has the scheduler side and the protocol):
copying a request's KV blocks out of and into this rank's paged KV cache, for every KV kind.

Legend: N blocks copied, B block size, X the rest of a cache tensor's row, in bytes (heads x head dim x dtype
size for GQA's k and v; kv_lora_rank + rope dim for MLA's latent; 1 byte per value for an fp8 cache).

`PagedKVBlocks` sees the runner's cache as *groups*, one per (cache tensors, block table) pair: each layer's
tensors with the request's one table (GQA: (k, v); MLA: (latent,)), or, for a model whose sliding and full
layers share tensors (gpt-oss, engine/config/layer_configs.py `kv_layer_pairs`), each shared set twice, once with
the full table and once with the sliding table. A block row of every tensor is copied as bytes (`uint8` views),
so the dtype (bf16, float32, fp8) needs no case of its own; `SavedKV` keeps the dtype and shapes, and a write
into a cache of another layout (block size, KV kind, dtype, layer count) is refused (ValueError).

`WorkerKVConnector` is what a connector's worker half implements. The model runner calls `start_load` before a
step's forward and `start_save` after it, inside the step's device work (so in the rank's stream order: a save
reads the KV the step wrote, a load lands before any later step reads it), and `poll()` when it collects the
step; the transfers ids polled go back to the scheduler (`ModelRunnerOutput.kv_transfers_done`). A start
returns at once for a transport that moves bytes in the background and reports them done at a later poll; the
in-host reference (engine/cluster/kv_inhost.py) copies while it starts and reports at the next poll.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moelink.scheduler.outputs import KVTransfer

FULL, SLIDING = "full", "sliding"


@dataclass
class SavedKV:
    """A request's KV blocks in host memory, as `PagedKVBlocks.read` copies them: per group, the table entries
    copied (indices into the request's table) and each tensor's rows of them, uint8 [N, B, X]."""

    num_tokens: int
    token_ids: tuple[int, ...]
    layout: tuple  # PagedKVBlocks.layout of the cache it came from
    groups: list[tuple[list[int], tuple[torch.Tensor, ...]]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for _, ts in self.groups for t in ts)


class PagedKVBlocks:
    """A rank's paged KV cache as block rows to copy (module docstring). `kv_caches`: the runner's per-layer
    tensor tuples; `kv_pairs`: its (full, sliding) layer pairs sharing tensors, or None."""

    def __init__(self, kv_caches: list[tuple[torch.Tensor, ...]], kv_pairs, block_size: int) -> None:
        if kv_pairs is None:
            self.groups = [(tensors, FULL) for tensors in kv_caches]
        else:
            self.groups = [g for full, sliding in kv_pairs for g in ((kv_caches[full], FULL),
                                                                     (kv_caches[sliding], SLIDING))]
        self.block_size = block_size
        # What a saved copy must match to be written here: per group its table kind, and per tensor its dtype
        # and the shape of one block row.
        self.layout = tuple((kind, tuple((str(t.dtype), tuple(t.shape[1:])) for t in tensors))
                            for tensors, kind in self.groups)

    @staticmethod
    def _table(t: KVTransfer, kind: str) -> list[int]:
        return t.block_ids if kind == FULL else t.sliding_block_ids

    def read_group(self, g: int, t: KVTransfer) -> tuple[list[int], tuple[torch.Tensor, ...]]:
        """Group g's blocks of `t` (entries from `first_block` on, NULL ones skipped) copied to host memory."""
        tensors, kind = self.groups[g]
        table = self._table(t, kind)
        idx = [i for i in range(t.first_block, len(table)) if table[i] >= 0]
        ids = torch.tensor([table[i] for i in idx], dtype=torch.long, device=tensors[0].device)
        # Device-to-host sync on CUDA (a blocking copy): a network transport would copy into pinned buffers
        # without blocking and report the transfer done once an event says so.
        rows = tuple(x.view(torch.uint8).index_select(0, ids).to("cpu") for x in tensors)
        return idx, rows

    def read(self, t: KVTransfer) -> SavedKV:
        return SavedKV(t.num_tokens, t.token_ids, self.layout, [self.read_group(g, t) for g in range(len(self.groups))])

    def write_group(self, g: int, t: KVTransfer, saved: SavedKV) -> None:
        """Group g's saved rows into the blocks `t` names (entries from `first_block` on; a saved entry whose
        block here is NULL is skipped: no query reads it)."""
        tensors, kind = self.groups[g]
        table = self._table(t, kind)
        idx, rows = saved.groups[g]
        keep = [j for j, i in enumerate(idx) if t.first_block <= i < len(table) and table[i] >= 0]
        if not keep:
            return
        dev = tensors[0].device
        ids = torch.tensor([table[idx[j]] for j in keep], dtype=torch.long, device=dev)
        sel = torch.tensor(keep, dtype=torch.long)
        for x, r in zip(tensors, rows):
            x.view(torch.uint8).index_copy_(0, ids, r.index_select(0, sel).to(dev))

    def write(self, t: KVTransfer, saved: SavedKV) -> None:
        """Copy `saved` into this cache at `t`'s blocks; ValueError when it cannot hold it."""
        diff = layout_difference(saved.layout, self.layout)
        if diff is not None:
            raise ValueError(f"request {t.req_id!r}: the saved KV has another layout than this rank's cache: {diff}.")
        if saved.num_tokens < t.num_tokens:
            raise ValueError(f"request {t.req_id!r}: {saved.num_tokens} tokens saved, {t.num_tokens} to load.")
        for g in range(len(self.groups)):
            self.write_group(g, t, saved)


def layout_difference(theirs: tuple, ours: tuple) -> str | None:
    """What differs between two `PagedKVBlocks.layout`s, in words ("block size 4 vs 8", ...); None: the same.
    `theirs` first (the saved KV, or the remote engine's), `ours` second."""
    if theirs == ours:
        return None
    if len(theirs) != len(ours):
        return (f"{len(theirs)} vs {len(ours)} cache groups (the number of attention layers, counted twice for a "
                f"model whose sliding and full layers share tensors)")
    for g, ((kind_a, ts_a), (kind_b, ts_b)) in enumerate(zip(theirs, ours)):
        if kind_a != kind_b:
            return f"group {g} is read with the {kind_a!r} table vs the {kind_b!r} table (another KV kind)"
        if len(ts_a) != len(ts_b):
            return (f"{len(ts_a)} vs {len(ts_b)} cache tensors per layer (another KV kind: GQA has k and v, "
                    f"MLA one latent)")
        for (dt_a, sh_a), (dt_b, sh_b) in zip(ts_a, ts_b):
            if dt_a != dt_b:
                return f"KV cache dtype {dt_a} vs {dt_b}"
            if sh_a[:1] != sh_b[:1]:
                return f"block size {sh_a[0]} vs {sh_b[0]}"
            if tuple(sh_a) != tuple(sh_b):
                return (f"a block's row per token is {tuple(sh_a[1:])} vs {tuple(sh_b[1:])} (KV heads x head dim, "
                        f"or the MLA latent width)")
    return "the layouts differ"  # not reached for layouts PagedKVBlocks builds


class WorkerKVConnector(Protocol):
    """A connector's worker half (module docstring). Called from the rank's device work (starts) and its
    collect (poll); a transfer that fails is reported failed, never raised."""

    def start_load(self, transfer: KVTransfer, kv: PagedKVBlocks) -> None: ...

    def start_save(self, transfer: KVTransfer, kv: PagedKVBlocks) -> None: ...

    def poll(self) -> dict[int, bool] | None:
        """Transfer id -> True (done) / False (failed) for the transfers that ended since the last poll."""

    def drop_pending(self) -> None:
        """Forget the transfers in flight and the reports not polled yet, and never write for them (an elastic
        rewind: the scheduler counted them failed and its blocks may go to other requests)."""

    def close(self) -> None:
        """Release what the worker half holds (a server's socket and threads); called when the rank shuts down."""




def start_transfers(connector: "WorkerKVConnector | None", transfers, blocks: "PagedKVBlocks", *, saves: bool) -> None:
    """Start a step's planned KV loads (before its forward) or saves (after it) on `connector`; nothing when the
    step plans none (`transfers` None)."""
    if transfers is None:
        return
    for t in transfers.saves if saves else transfers.loads:
        (connector.start_save if saves else connector.start_load)(t, blocks)


__all__ = ["FULL", "SLIDING", "PagedKVBlocks", "SavedKV", "WorkerKVConnector", "layout_difference", "start_transfers"]
