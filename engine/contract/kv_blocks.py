"""The worker side of the KV connector seam, a contract between the model runner and the connectors of
engine/kv_transfer/ (scheduler/kv_connector.py has the scheduler side and the protocol):
copying a request's KV blocks out of and into this rank's paged KV cache, for every KV kind.

Legend: N blocks copied, B block size, X the rest of a cache tensor's row, in bytes (heads x head dim x dtype
size for GQA's k and v; kv_lora_rank + rope dim for MLA's latent; 1 byte per value for an fp8 cache).

`PagedKVBlocks` sees the runner's cache as *groups*, one per (cache tensors, block table) pair: each layer's
tensors with the request's one table (GQA: (k, v); MLA: (latent,)), or, for a model whose sliding and full
layers share tensors (gpt-oss, engine/models/gqa_config.py `kv_layer_pairs`), each shared set twice, once with
the full table and once with the sliding table. A model with per-sequence state (linear attention's conv and
recurrent states, engine/state/cache.py) adds one "state" group per such layer: its state pools, whose one
"block" is the request's state slot (`KVTransfer.state_slot`), copied whatever `first_block` says (a prefix hit
gives blocks, never the state at the transfer's end); its rows are [1, *one slot's state]. A block row of every
tensor is copied as bytes (`uint8` views),
so the dtype (bf16, float32, fp8) needs no case of its own; `SavedKV` keeps the dtype and shapes, and a write
into a cache of another layout (block size, KV kind, dtype, layer count) is refused (ValueError). Under tensor
parallelism a write may carry only some of a GQA cache's kv heads (`write_group`'s `heads`: a prefill TP rank's
shard, engine/kv_transfer/tp_shard.py), written into those heads of each block row.

`WorkerKVConnector` is what a connector's worker half implements. The model runner calls `start_load` before a
step's forward and `start_save` after it, inside the step's device work (so in the rank's stream order: a save
reads the KV the step wrote, a load lands before any later step reads it), and `poll()` when it collects the
step; the transfers ids polled go back to the scheduler (`ModelRunnerOutput.kv_transfers_done`). A start
returns at once for a transport that moves bytes in the background and reports them done at a later poll; the
in-host reference (engine/kv_transfer/inhost.py) copies while it starts and reports at the next poll.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moelink.scheduler.outputs import KVTransfer

FULL, SLIDING, STATE = "full", "sliding", "state"


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


_WIDE = (torch.int64, torch.int32, torch.int16)


def wide_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The widest integer type every uint8 tensor of `xs` can be viewed as (its last dim and storage offset
    divisible): index_select / index_copy_ move elements one at a time, so moving 8-byte elements instead of bytes
    is ~10x faster on a CPU (measured: 2.5 -> 25 GB/s for MLA block rows) and needs 8x fewer accesses on a GPU."""
    for dt in _WIDE:
        if all(x.shape[-1] % dt.itemsize == 0 and x.storage_offset() % dt.itemsize == 0 and x.stride(-1) == 1
               for x in xs):
            return dt
    return torch.uint8


def _gather(x: torch.Tensor, ids_N: torch.Tensor) -> torch.Tensor:
    """Rows `ids_N` of cache tensor `x` as uint8 [N, B, ..., X bytes] (the saved form), gathered wide."""
    u8 = x.view(torch.uint8)
    return u8.view(wide_dtype(u8)).index_select(0, ids_N).view(torch.uint8)


class PendingRead:
    """A `PagedKVBlocks.read_async` in flight: `saved` holds its bytes once `done()` (a CUDA event query, no
    sync); `keep` holds the device tensors the copy reads until then."""

    def __init__(self, saved: SavedKV, event=None, keep=()) -> None:
        self.saved, self._event, self._keep = saved, event, keep

    def done(self) -> bool:
        if self._event is not None and not self._event.query():
            return False
        self._event, self._keep = None, ()
        return True


class PagedKVBlocks:
    """A rank's paged KV cache as block rows to copy (module docstring). `kv_caches`: the runner's per-layer
    tensor tuples; `kv_pairs`: its (full, sliding) layer pairs sharing tensors, or None; `state_caches`: its
    per-sequence state pools (engine/state/cache.StateCaches), or None. A stateful layer's entry of
    `kv_caches` ends with its state pools (the runner appends them after its paged tensors, if any)."""

    def __init__(self, kv_caches: list[tuple[torch.Tensor, ...]], kv_pairs, block_size: int,
                 state_caches=None) -> None:
        states = list(state_caches.layers) if state_caches is not None else [None] * len(kv_caches)

        def paged(i: int) -> tuple[torch.Tensor, ...]:
            n = len(states[i]) if states[i] is not None else 0
            return tuple(kv_caches[i])[:len(kv_caches[i]) - n]

        if kv_pairs is None:
            self.groups = [(paged(i), FULL) for i in range(len(kv_caches)) if paged(i)]
        else:
            self.groups = [g for full, sliding in kv_pairs for g in ((paged(full), FULL), (paged(sliding), SLIDING))]
        self.groups += [(tuple(pools), STATE) for pools in states if pools is not None]
        self.block_size = block_size
        self.device = next((t.device for ts, _ in self.groups for t in ts), torch.device("cpu"))
        self._copy_stream: torch.cuda.Stream | None = None  # CUDA: the side stream of read_async, made on first use
        # What a saved copy must match to be written here: per group its table kind, and per tensor its dtype
        # and the shape of one block row.
        self.layout = tuple((kind, tuple((str(t.dtype), tuple(t.shape[1:])) for t in tensors))
                            for tensors, kind in self.groups)

    @staticmethod
    def _table(t: KVTransfer, kind: str) -> list[int]:
        if kind == STATE:  # one entry: the request's slot (none without one)
            return [t.state_slot] if t.state_slot >= 0 else []
        return t.block_ids if kind == FULL else t.sliding_block_ids

    @staticmethod
    def _first(t: KVTransfer, kind: str) -> int:
        """The first table entry copied: `first_block` for blocks, 0 for a state (a prefix hit gives no state)."""
        return 0 if kind == STATE else t.first_block

    def _block_ids(self, t: KVTransfer, device: torch.device) -> dict[str, tuple[list[int], torch.Tensor]]:
        """Per table kind, the entries of `t`'s table to copy (from `first_block` on, NULL ones skipped) and their
        block ids as a device tensor: built once per kind, shared by every group that reads that table."""
        out = {}
        for _, kind in self.groups:
            if kind not in out:
                table = self._table(t, kind)
                idx = [i for i in range(self._first(t, kind), len(table)) if table[i] >= 0]
                out[kind] = idx, torch.tensor([table[i] for i in idx], dtype=torch.long, device=device)
        return out

    def read(self, t: KVTransfer) -> SavedKV:
        """`t`'s blocks copied to host memory now. Device-to-host sync on CUDA (a blocking copy); `read_async`
        is the non-blocking form."""
        ids = self._block_ids(t, self.device)
        groups = [(ids[kind][0], tuple(_gather(x, ids[kind][1]).to("cpu") for x in tensors))
                  for tensors, kind in self.groups]
        return SavedKV(t.num_tokens, t.token_ids, self.layout, groups)

    def read_async(self, t: KVTransfer) -> "PendingRead":
        """`t`'s blocks on their way to host memory: on CUDA the rows are gathered on the device and copied into
        pinned buffers on a side stream that first waits for the work enqueued so far (the step that wrote this
        KV), so the copy overlaps the next steps' compute and the host never waits; `PendingRead.done()` says
        when the bytes are there. The caller keeps the blocks until then (the scheduler holds them until the
        save is reported). On CPU it is `read`, done at once."""
        if self.device.type != "cuda":
            return PendingRead(self.read(t))
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        stream = self._copy_stream
        ids = self._block_ids(t, self.device)
        # A state slot is rewritten by the request's next step (its blocks are not): gathered here, in stream
        # order before that step, and only copied out on the side stream.
        snap = {g: tuple(_gather(x, ids[STATE][1]) for x in tensors)
                for g, (tensors, kind) in enumerate(self.groups) if kind == STATE}
        stream.wait_stream(torch.cuda.current_stream(self.device))
        keep, groups = [], []
        with torch.cuda.stream(stream):
            for g, (tensors, kind) in enumerate(self.groups):
                idx, ids_N = ids[kind]
                rows = []
                for j, x in enumerate(tensors):
                    dev_rows = snap[g][j] if g in snap else _gather(x, ids_N)
                    host_rows = torch.empty(dev_rows.shape, dtype=torch.uint8, pin_memory=True)
                    host_rows.copy_(dev_rows, non_blocking=True)
                    keep.append(dev_rows)  # freed once the copy is done (PendingRead.done)
                    rows.append(host_rows)
                groups.append((idx, tuple(rows)))
            keep.extend(i for _, i in ids.values())
            event = torch.cuda.Event()
            event.record(stream)
        return PendingRead(SavedKV(t.num_tokens, t.token_ids, self.layout, groups), event, keep)

    def write_group(self, g: int, t: KVTransfer, idx: list[int], rows: tuple[torch.Tensor, ...],
                    heads: tuple[int, int] | None = None) -> None:
        """Group g's rows (`idx`: the entries of the request's table they are of) into the blocks `t` names
        (entries from `first_block` on; an entry whose block here is NULL is skipped: no query reads it). The rows
        may be in host memory (pinned where the transport pinned them: the copy does not block the host), a
        shared mapping, or on this device (a collective transport received them there); the copy is enqueued on
        the current stream. `heads` (offset, count): the rows are those of this cache's kv heads [offset, offset +
        count) only (a shard of a prefill rank under tensor parallelism, engine/kv_transfer/tp_shard.py), written
        into those heads of a head-split group's [.., B, H, X] tensors; other groups take their rows whole."""
        tensors, kind = self.groups[g]
        if heads is not None and kind != STATE and all(x.dim() == 4 for x in tensors):
            tensors = tuple(x[:, :, heads[0]:heads[0] + heads[1]] for x in tensors)
        table = self._table(t, kind)
        first = self._first(t, kind)
        keep = [j for j, i in enumerate(idx) if first <= i < len(table) and table[i] >= 0]
        if not keep:
            return
        dev = tensors[0].device
        ids = torch.tensor([table[idx[j]] for j in keep], dtype=torch.long, device=dev)
        sel = None if len(keep) == len(idx) else torch.tensor(keep, dtype=torch.long, device=rows[0].device)
        for x, r in zip(tensors, rows):
            r = (r if sel is None else r.index_select(0, sel)).to(dev, non_blocking=True)
            dt = wide_dtype(x.view(torch.uint8), r)
            x.view(torch.uint8).view(dt).index_copy_(0, ids, r.view(dt))

    def check_fits(self, t: KVTransfer, layout: tuple, num_tokens: int) -> None:
        """ValueError unless KV of `layout` for `num_tokens` tokens can be written at `t`'s blocks."""
        diff = layout_difference(layout, self.layout)
        if diff is not None:
            raise ValueError(f"request {t.req_id!r}: the saved KV has another layout than this rank's cache: {diff}.")
        if num_tokens < t.num_tokens:
            raise ValueError(f"request {t.req_id!r}: {num_tokens} tokens saved, {t.num_tokens} to load.")

    def write(self, t: KVTransfer, saved: SavedKV) -> None:
        """Copy `saved` into this cache at `t`'s blocks; ValueError when it cannot hold it."""
        self.check_fits(t, saved.layout, saved.num_tokens)
        for g, (idx, rows) in enumerate(saved.groups):
            self.write_group(g, t, idx, rows)


def layout_difference(theirs: tuple, ours: tuple) -> str | None:
    """What differs between two `PagedKVBlocks.layout`s, in words ("block size 4 vs 8", ...); None: the same.
    `theirs` first (the saved KV, or the remote engine's), `ours` second."""
    if theirs == ours:
        return None
    if len(theirs) != len(ours):
        return (f"{len(theirs)} vs {len(ours)} cache groups (the number of attention layers, counted twice for a "
                f"model whose sliding and full layers share tensors, plus one per linear-attention layer's state)")
    for g, ((kind_a, ts_a), (kind_b, ts_b)) in enumerate(zip(theirs, ours)):
        if kind_a != kind_b:
            return f"group {g} is read with the {kind_a!r} table vs the {kind_b!r} table (another KV kind)"
        if kind_a == STATE and ts_a != ts_b:
            return (f"a linear-attention layer's per-sequence state is {ts_a} vs {ts_b} (dtype and shape of its conv "
                    f"and recurrent states)")
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


__all__ = ["FULL", "SLIDING", "STATE", "PagedKVBlocks", "PendingRead", "SavedKV", "WorkerKVConnector",
           "layout_difference", "start_transfers"]
