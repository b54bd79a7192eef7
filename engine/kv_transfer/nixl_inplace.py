"""NIXL in place: a prefill rank holds a saved request's blocks in its paged cache (no copy when the save is made)
until a fetch claims them, and a decode rank READs what it is given straight into its own blocks (issue 47 item 1;
scoped to one fetch in issue 53).

Legend: N a request's block entries moved, B block size, X the rest of a cache row in bytes.

Prefill side. `HoldRegion.held` names a save's blocks (`HeldKV`: the save's transfer, its cache and, on CUDA, an
event after the step that wrote them); the rank's store holds it until one fetch claims it, or `nixl_hold_s` passes,
or newer holds push it out (store.py: a share of the cache in all, a smaller one per client, oldest first). Only a
request that asked for the handoff itself is held (a prefill server's role default is copied: engine/kv_transfer/
config.py's SaveKey). The cache itself is never registered with NIXL: at the claim, `stage` copies exactly that
request's rows out to host memory (after the writing step's event on CUDA) and the hold ends at once, then
`reply_staged` registers that copy alone for the one fetch (nixl.py says when: only for a peer the deployment
secret authenticated) and names it in the in-place shape (`staged_nixl`: per group a table of entries 0..n-1, per
tensor a base and its row stride), deregistering it when the reader says "read", goes away, or the deadline passes.
So a peer can reach no block of the cache, another request's or a shared prefix's, for reading or writing: what it
may WRITE into is its own copy, which nothing else reads.

Decode side. The fetching agent holds the decode rank's cache registered once (`register_at_allocation`), and posts
one READ per group from the announced rows into the rows of the blocks the scheduler reserved for the load
(entries below `first_block` or NULL here are skipped, as `PagedKVBlocks.write_group` skips them): no staging
buffer, and each group is reported landed (`ArrivalWriter.landed`) as its READ completes while the later groups'
READs are in flight (layer-pipelined). Its metadata never leaves the process.

Where holding does not apply the copy path stays (the save copied to host memory when made, engine/kv_transfer/
remote_worker.py): a cache with per-sequence state groups (Qwen3-Next's linear attention, DeepSeek-V4's windows: a
state slot is rewritten by the request's next step), a cache whose block rows are not contiguous, a save past the
hold bounds, or `nixl_in_place=False`. A decode rank whose layout differs (block size, KV kind, dtype) is refused by
the layout check, as over every transport.
"""
from __future__ import annotations

import base64
import logging
import socket
import threading
from dataclasses import dataclass, field

import torch

from moelink.scheduler.outputs import KVTransfer

from .arrival import ArrivalWriter
from ..contract.kv_blocks import STATE, PagedKVBlocks, SavedKV
from .wire import MAX_HELLO_BYTES, Deadline, KVFetchError, recv_header, saved_header, send_header

logger = logging.getLogger(__name__)


def mem_type(device: torch.device) -> str:
    """NIXL's memory type for tensors on `device`."""
    return "VRAM" if device.type == "cuda" else "DRAM"


def _dev_id(x: torch.Tensor) -> int:
    return (x.device.index or 0) if x.is_cuda else 0


def in_place_ok(kv: PagedKVBlocks) -> str | None:
    """Why `kv` cannot be read in place (module docstring), or None when it can."""
    if not isinstance(kv, PagedKVBlocks):
        return "not a paged cache"
    if not kv.groups:
        return "no cache tensors"
    if any(kind == STATE for _, kind in kv.groups):
        return "per-sequence state groups (copied at save time)"
    for tensors, _ in kv.groups:
        for x in tensors:
            if x.dim() < 2 or not x[0].is_contiguous():
                return "a cache tensor whose block rows are not contiguous"
    return None


def row_descs(x: torch.Tensor, block_ids: list[int]) -> list[tuple[int, int]]:
    """(address, bytes) of block rows `block_ids` of cache tensor `x` ([num_blocks, B, ...], rows contiguous)."""
    row = x[0].numel() * x.element_size()
    stride = x.stride(0) * x.element_size()
    base = x.data_ptr()
    return [(base + b * stride, row) for b in block_ids]


def entries(kv: PagedKVBlocks, t: KVTransfer, kind: str) -> list[int]:
    """The entries of `t`'s table of `kind` that move (from `first_block` on, NULL ones skipped)."""
    table = kv._table(t, kind)
    return [i for i in range(kv._first(t, kind), len(table)) if table[i] >= 0]


@dataclass
class HeldKV(SavedKV):
    """A saved request whose blocks stay in the prefill rank's cache (module docstring): nothing copied and nothing
    registered until a fetch claims it. `groups` carries `meta` tensors of the rows' shapes (what the reply header
    announces and `nbytes` counts; nothing is allocated); `transfer`: the save (its block tables), which `stage`
    reads the rows by; `kv`: the cache they are in; `ready`: a CUDA event after the step that wrote them; `client`:
    whom the hold counts against (the request's widest client name; () anonymous)."""

    transfer: KVTransfer | None = None
    kv: PagedKVBlocks | None = None
    transfer_id: int = -1
    ready: torch.cuda.Event | None = None
    hold_until: float = 0.0  # the store's clock time the hold ends at (SavedKVStore.hold sets it)
    client: tuple = ()
    held_bytes: int | None = None  # the cache bytes its blocks keep out of the pool (None: the rows' bytes)

    @property
    def nbytes(self) -> int:
        # What the hold bounds count: a block row held once, however many groups read it (gpt-oss's sliding and
        # full layers share their tensors, so the rows summed over groups would count those blocks twice).
        return super().nbytes if self.held_bytes is None else self.held_bytes


class HoldRegion:
    """A prefill rank's paged cache whose saves are held in place (module docstring). Nothing of it is registered
    with NIXL: a peer never gets a key to the cache, only to the copy of one claimed request's rows (`stage`)."""

    def __init__(self, kv: PagedKVBlocks) -> None:
        self.kv = kv

    def held(self, t: KVTransfer, client: tuple = ()) -> HeldKV:
        """`t`'s blocks named in place (module docstring); on CUDA after an event recorded now, in stream order
        after the step that wrote them."""
        kv = self.kv
        groups, blocks = [], {}  # blocks: per cache tensor, the block ids the hold keeps and a block row's bytes
        for tensors, kind in kv.groups:
            idx = entries(kv, t, kind)
            rows = tuple(torch.empty((len(idx),) + tuple(x.shape[1:-1]) + (x.shape[-1] * x.element_size(),),
                                     dtype=torch.uint8, device="meta") for x in tensors)
            groups.append((idx, rows))
            table = kv._table(t, kind)
            for x in tensors:
                ids, _ = blocks.setdefault(x.data_ptr(), (set(), x[0].numel() * x.element_size()))
                ids.update(table[i] for i in idx)
        held_bytes = sum(len(ids) * row for ids, row in blocks.values())
        ready = None
        if kv.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(kv.device))
        return HeldKV(t.num_tokens, t.token_ids, kv.layout, groups, t, kv, t.transfer_id, ready, client=client,
                      held_bytes=held_bytes)


def stage(held: HeldKV) -> SavedKV:
    """A claimed hold's rows copied out of the cache into host memory now (the only memory a peer will be given a
    key to, never the cache's). A host sync on CUDA, on the fetch's connection thread: first the step that wrote the
    blocks (`ready`), then the gather and the device-to-host copy. The caller releases the hold right after: the
    blocks go back to the pool before any byte leaves."""
    if held.ready is not None:
        held.ready.synchronize()  # host sync: the step that wrote these blocks
    return held.kv.read(held.transfer)


class CacheRegion:
    """A decode rank's paged cache registered with its fetching NIXL agent, once (module docstring), so READs land
    straight in its blocks. The agent's metadata of it never leaves the process: only the reader holds the key."""

    def __init__(self, agent, kv: PagedKVBlocks) -> None:
        tensors = cache_tensors(kv)
        self.kv = kv
        self.mem = mem_type(kv.device)
        # Each tensor's span from its first block row to the end of its last (a view's rows may be strided).
        self.reg = agent.register([(x.data_ptr(), ((x.shape[0] - 1) * x.stride(0) + x[0].numel()) * x.element_size(),
                                    _dev_id(x), "") for x in tensors], self.mem)
        self.dev_id = _dev_id(tensors[0])

    def local_descs(self, t: KVTransfer, g: int, idx: list[int]) -> tuple[list[int], list[list[tuple[int, int]]]]:
        """For a load of `t`: which of group g's announced entries `idx` land here (positions into `idx`) and, per
        tensor, the (address, bytes) of this cache's rows they land in."""
        tensors, kind = self.kv.groups[g]
        table = self.kv._table(t, kind)
        first = self.kv._first(t, kind)
        keep = [j for j, i in enumerate(idx) if first <= i < len(table) and table[i] >= 0]
        ids = [table[idx[j]] for j in keep]
        return keep, [row_descs(x, ids) for x in tensors]


class CacheRegions:
    """The regions one agent registered, by cache (a rank has one; tests may make more), each made once; a cache
    that cannot be read in place (or whose registration NIXL refused) is remembered as None and never retried."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_kv: dict[int, tuple[PagedKVBlocks, CacheRegion | None]] = {}
        self.num_registered = 0  # regions made: one per cache, whatever the fetches or saves

    def get(self, agent, kv: PagedKVBlocks) -> CacheRegion | None:
        with self._lock:
            got = self._by_kv.get(id(kv))
            if got is not None and got[0] is kv:
                return got[1]
            why, region = in_place_ok(kv), None
            if why is None:
                try:
                    region = CacheRegion(agent, kv)
                    self.num_registered += 1
                except Exception as exc:  # NIXL's own (a UCX that cannot register this memory): the copy path
                    why = f"NIXL did not register it: {exc}"
            if why is not None:
                logger.info("KV cache not read in place over NIXL (the copy path serves it): %s", why)
            self._by_kv[id(kv)] = (kv, region)
            return region

    def bind(self, agent, kv: PagedKVBlocks) -> CacheRegion | None:
        """`kv` registered now, as the rank's one cache (`register_at_allocation`): every other cache this agent
        registered is deregistered first (a cache allocated again: the old tensors go back to the allocator, and
        NIXL must not keep their memory registered). Then as `get`."""
        with self._lock:
            stale = [r for k, r in self._by_kv.values() if k is not kv and r is not None]
            self._by_kv = {i: e for i, e in self._by_kv.items() if e[0] is kv}
        for region in stale:
            agent.unexpose(region.reg)
        return self.get(agent, kv)

    def take_all(self) -> list[CacheRegion]:
        with self._lock:
            regions, self._by_kv = [r for _, r in self._by_kv.values() if r is not None], {}
        return regions


def register_at_allocation(transport, kv: PagedKVBlocks) -> CacheRegion | None:
    """A loading rank's cache registered with `transport`'s fetching NIXL agent as the rank allocates it (module
    docstring). None where the transport is not NIXL or the cache cannot be read into in place (the reads then land
    in a staging buffer). The serving agent never registers the cache."""
    if getattr(transport, "name", None) != "nixl":  # by name: transport.py imports this module's users
        return None
    agent = transport.agent(serving=False)
    return agent.regions.bind(agent, kv)


def cache_tensors(kv: PagedKVBlocks) -> list[torch.Tensor]:
    """`kv`'s cache tensors, each once (gpt-oss's sliding and full layers share theirs)."""
    seen, out = set(), []
    for tensors, _ in kv.groups:
        for x in tensors:
            if x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                out.append(x)
    return out


def cache_nbytes(kv: PagedKVBlocks) -> int:
    """The bytes of `kv`'s cache tensors, each counted once."""
    return sum(x.numel() * x.element_size() for x in cache_tensors(kv))


def announced_blocks(nixl: dict, plan: SavedKV) -> tuple[list, str, int]:
    """A held reply's block rows, per group and tensor (row bytes, [address per announced entry]), checked against
    `plan` (the reply header as this rank's layout reads it), with the prefill memory's type and device id."""
    try:
        tables = [[int(b) for b in ids] for ids in nixl["tables"]]
        layout = [(int(ti), [(int(a), int(st), int(row)) for a, st, row in ts]) for ti, ts in nixl["tensors"]]
        far_mem, far_dev = nixl["mem"], int(nixl["dev"])
    except (KeyError, TypeError, ValueError) as exc:
        raise KVFetchError(f"a NIXL reply without its blocks' addresses: {exc!r}") from None
    if far_mem not in ("DRAM", "VRAM") or len(layout) != len(plan.groups):
        raise KVFetchError("a NIXL reply whose blocks do not match its groups")
    blocks = []
    for (idx, rows), (ti, ts) in zip(plan.groups, layout):
        if not 0 <= ti < len(tables) or len(tables[ti]) != len(idx) or len(ts) != len(rows):
            raise KVFetchError("a NIXL reply whose blocks do not match its groups")
        if any(row != int(torch.Size(r.shape[1:]).numel()) for r, (_, _, row) in zip(rows, ts)):
            raise KVFetchError("a NIXL reply whose block rows are not its shapes'")
        blocks.append([(row, [a + b * st for b in tables[ti]]) for a, st, row in ts])
    return blocks, far_mem, far_dev


def deliver(agent, plan: SavedKV, handles: list, views: list, deadline: Deadline, on_group, landed=None) -> list:
    """Each group handed on as its READ (`handles[g]`, None: nothing to read) completes, in order, while the later
    ones are still in flight: to `landed(g, nbytes)` when it was READ into the cache blocks, else to
    `on_group(g, idx, rows)`, else kept (cloned out of the reused buffer). A handle waited for is set to None (the
    caller releases the rest). Returns the SavedKV's groups (no rows when handed on)."""
    groups = []
    for g, (idx, _) in enumerate(plan.groups):
        if handles[g] is not None:
            agent.wait(handles[g], deadline)
            handles[g] = None
        if landed is not None:
            landed(g, views[g])
        elif on_group is not None:
            on_group(g, idx, views[g])  # written into the cache blocks while later groups arrive
        else:
            groups.append((idx, tuple(v.clone() for v in views[g])))
            continue
        groups.append((idx, ()))
    return groups


def read_blocks(agent, remote: str, nixl: dict, plan: SavedKV, on_group, deadline: Deadline, pin: bool) -> list:
    """Read a held reply's blocks (module docstring): into the decode rank's own blocks when `on_group` is the
    connector's ArrivalWriter (its cache registered once with `agent`), else through a registered host buffer (a
    staging copy, counted in `agent.num_staged_bytes`). Every group's READ is posted at once and each is handed on
    as it lands. Returns the groups for the SavedKV (no rows when handed on)."""
    blocks, far_mem, far_dev = announced_blocks(nixl, plan)
    writer = on_group if isinstance(on_group, ArrivalWriter) else None
    region = agent.regions.get(agent, writer.kv) if writer is not None else None
    buf = reg = None
    handles: list = []
    if region is None:
        total = sum(r.numel() for _, rows in plan.groups for r in rows)
        buf, reg = agent.take_buffer(total, pin)
        agent.num_staged_bytes += total
    else:
        writer.in_place()
    try:
        views, at = [], 0
        for g, (idx, rows) in enumerate(plan.groups):
            local, far = [], []
            if region is not None:
                keep, mine = region.local_descs(writer.t, g, idx)
                for (row, addrs), descs in zip(blocks[g], mine):
                    local += descs
                    far += [(addrs[j], row) for j in keep]
                views.append(sum(n for _, n in local))
                mem = (region.mem, region.dev_id)
            else:
                vs = []
                for r, (row, addrs) in zip(rows, blocks[g]):
                    n = r.numel()
                    vs.append(buf[at:at + n].view(r.shape))
                    local += [(buf.data_ptr() + at + k * row, row) for k in range(len(addrs))]
                    far += [(a, row) for a in addrs]
                    at += n
                views.append(tuple(vs))
                mem = ("DRAM", 0)
            handles.append(agent.read_descs(remote, local, mem, far, (far_mem, far_dev)) if local else None)
        return deliver(agent, plan, handles, views, deadline, on_group, writer.landed if region is not None else None)
    finally:
        for h in handles:
            if h is not None:
                h.release()  # aborted before the prefill rank may free the blocks
        if region is not None:
            writer.in_place_done()
        if buf is not None:
            agent.give_buffer(buf, reg)



def staged_nixl(agent, saved: SavedKV) -> tuple[object, dict]:
    """`saved`'s rows (host copies of one claimed request's blocks: `stage`, or a copied save) registered with
    `agent` for one fetch, and the reply's `nixl` object naming them in the in-place shape (per group a table of
    entries 0..n-1, and per tensor (base, row bytes as the stride, row bytes)), so a decode rank whose cache is
    registered READs them straight into its blocks. The registration covers these rows only: nothing of the cache,
    nothing of another request. Returns (registration or None, nixl object)."""
    tables, tensors, live = [], [], []
    for g, (idx, rows) in enumerate(saved.groups):
        tables.append(list(range(len(idx))))
        layout = []
        for r in rows:
            row = int(torch.Size(r.shape[1:]).numel()) * r.element_size()
            layout.append((r.data_ptr(), row, row))
            if r.numel():
                live.append(r)
        tensors.append((g, layout))
    reg, meta = agent.expose(live) if live else (None, b"")
    return reg, {"agent": agent.name, "meta": base64.b64encode(meta).decode(), "mem": "DRAM", "dev": 0,
                 "tables": tables, "tensors": tensors}


def reply_staged(conn: socket.socket, agent, saved: SavedKV, deadline: Deadline) -> None:
    """The ok reply to an authenticated peer over NIXL (nixl.py): `saved`'s rows registered for this fetch only
    (`staged_nixl`), deregistered when the reader says "read", goes away, or the reply deadline passes."""
    saved = SavedKV(saved.num_tokens, saved.token_ids, saved.layout,
                    [(idx, tuple(t.contiguous() for t in ts)) for idx, ts in saved.groups])
    reg, nixl = staged_nixl(agent, saved)
    try:
        header = saved_header(saved)
        header["nixl"] = nixl
        send_header(conn, header, deadline)
        recv_header(conn, deadline, MAX_HELLO_BYTES)  # "read": its READs are done or abandoned
    finally:
        if reg is not None:
            agent.unexpose(reg)


def read_held(agent, nixl: dict, plan: SavedKV, on_group, deadline: Deadline, pin: bool) -> list:
    """A held reply's blocks READ (nixl_inplace.read_blocks) under the prefill agent's turn, its metadata loaded."""
    remote, failed = nixl["agent"], True
    turn = agent.turn(remote, deadline)
    try:
        agent.load_remote(remote, base64.b64decode(nixl["meta"], validate=True))
        groups = read_blocks(agent, remote, nixl, plan, on_group, deadline, pin)
        failed = False
        return groups
    finally:
        if failed:
            agent.forget_remote(remote)  # a failed peer's endpoint is not reused
        turn.release()


__all__ = ["CacheRegion", "CacheRegions", "HeldKV", "HoldRegion", "announced_blocks", "cache_nbytes", "cache_tensors",
           "deliver", "entries", "in_place_ok", "mem_type", "read_blocks", "read_held", "register_at_allocation", "reply_staged", "row_descs",
           "stage", "staged_nixl"]
