"""The KV connector seam: moving a request's KV blocks between engines (prefill/decode disaggregation).

Two halves, as in vLLM v1. The scheduler side (`KVConnector`, here, pure Python) decides *which* blocks of which
request move: a request whose prompt KV another engine saved is loaded instead of computed, and a request's prompt
KV is saved once its prefill step has run. The worker side (engine/contract/kv_blocks.py: `WorkerKVConnector`, and
`PagedKVBlocks`, which copies a request's blocks out of / into the rank's paged cache for every KV kind) moves the
bytes. Between them travel `KVTransfer` records: planned in `SchedulerOutput.kv_transfers` (loads run before the
step's forward, saves after it, in the rank's stream order) and reported back by id in
`ModelRunnerOutput.kv_transfers_done` when they end, maybe several steps later (the transfers are asynchronous:
start, then poll; per request).

`KVTransfers` is the scheduler's bookkeeping, built only when a connector is given (`Scheduler(...,
kv_connector=...)`; None, the default, costs the step loop nothing):

- load: a fresh request at the head of the waiting queue for which the connector has more leading tokens than
  the prefix cache gets blocks for them and waits in `RequestStatus.WAITING_FOR_KV` (no model step, its blocks
  held). A load still on the network holds no sequence slot (a source that accepts and stays silent must not
  fill max_num_seqs): the loads in flight are bounded instead (`LoadLimits`, from the connector's `load_limits`:
  in all, per source, per client, and the share of the KV blocks they hold), and a request that would pass a
  bound is computed here instead of loaded. Loaded, it waits for a slot and is admitted before the waiting queue
  with every loaded token computed but the last prompt token (whose logits it needs); failed, its blocks are
  freed and it is recomputed (back at the front of the queue as a preempted request). A connector whose loads
  nothing authenticated (`trusted_loads` False) has them kept out of the prefix cache: such KV serves only the
  request that named its source.
- save: a request the connector wants saved is watched until the step that computes its last prompt token is
  scheduled; that step saves blocks [0, ceil(prompt / block_size)) after its forward, under the key the
  connector's optional `save_params(req)` gives (a capability; carried in the save's `KVTransfer.params`).
- every transfer holds its own reference on its blocks until it is reported, so a request aborted, preempted or
  finished meanwhile (a prefill-only request ends with its first token) gives its own references back at once,
  while no block a transfer still reads or writes can go to another request.
- a held save (a connector whose `holds_saves` is True: NIXL in place, engine/kv_transfer/nixl_inplace.py) is
  reported only when a decode engine has read the blocks in place, or its hold deadline passed: its references
  keep the blocks out of the pool until then. It does not keep the engine stepping back to back (a held save may
  wait minutes for a decode engine, and an offline `generate` must return before the decode engine reads): it is
  `busy`, and awaited by the step it plans, once per `HELD_POLL_S`, so an idle engine steps (an empty step whose
  worker polls) every 50 ms while it holds saves and gets their blocks back within that of the hold's end. A save
  whose params say `hold` False (a request that did not ask for the handoff itself: engine/kv_transfer/config.py's
  SaveKey) is copied by the worker, and awaited as any other save.
- a model with per-sequence state (linear attention: scheduler/hybrid_cache.py, the KV manager with
  `state_slot`): the state travels with the KV, in the request's slot (`KVTransfer.state_slot`). A recurrent
  state cannot be rewound, and the decode side computes the last prompt token itself (for its logits), so both
  sides move the prompt's first `n - 1` tokens: the prefill side ends a watched request's prompt chunk at
  `n - 1` (`chunk_limit`) and saves right after that step (its state and the blocks of those tokens; its next
  step computes the last token and samples as any), and the decode side loads `n - 1` tokens, its slot taking the
  saved state (not a prefix hit's checkpoint: `state_loaded`). A one-token prompt moves nothing.

- tier work (a connector with `step_ops`, the KV offload tiers: engine/kv_transfer/offload.py): the block pool
  records the cached blocks its allocations evict (`BlockPool.evicted`), and each step hands them to
  `step_ops(evicted)`; what it returns (plain data: which blocks to copy where) travels as a transfer of no
  request (`req_id` "", no blocks held: the evicted blocks already belong to their new requests) placed first
  among the step's loads, so the worker runs it before anything of the step writes those blocks. It is
  reported like any transfer (`transfer_done`). A connector with `bind(kv)` is given the KV cache manager when
  the scheduler is built (to read the prefix cache, or to refuse a cache policy it cannot serve).

Across processes (engine/kv_transfer/remote.py, issue 30) the connector adds, beside this seam: a key other than
the request id and the remote engine's address, carried per request (`SamplingParams.kv_transfer_params`, vLLM's
shape) and handed to the worker half in `KVTransfer.params` (`load_params`); the prefill output's parameters
(`request_finished`); a layout check between engines; fetch deadlines that report a load failed; and, under
elastic EP, dropping the loads a rewind undoes (`Scheduler.rewind` counts them failed; the runner's resync calls
the worker half's `drop_pending`). Still to come: per-layer pipelining (save each layer as its attention writes
it, load each before its attention reads it; the worker side gets the layers separately already), and loading a
saved prefix shorter than the prompt from another engine (the remote side's token count is not known up front).
"""
from __future__ import annotations

import dataclasses
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from .engine_output import KVTransferCounters
from .outputs import KVTransfer, KVTransferPlan
from .request import Request, RequestStatus


class KVConnector(Protocol):
    """The scheduler side of a KV connector (module docstring). Called on the engine thread, between steps."""

    def num_loadable_tokens(self, req: Request) -> int:
        """Leading tokens of a fresh request (its prompt) whose KV this connector can load; 0: none. Asked when
        the request reaches the head of the waiting queue, again on later steps while the pool has no room."""

    def wants_save(self, req: Request) -> bool:
        """Whether to save this request's prompt KV once it is computed. Asked once, when the request is added."""

    def transfer_done(self, transfer: KVTransfer, ok: bool) -> None:
        """A load or save ended (ok) or failed. The scheduler has acted on it: a loaded request runs next, a
        failed load is recomputed, a saved request's blocks are released."""

    # Optional: `request_finished(req) -> object | None`, what the request's output carries for the engine that
    # continues it (`EngineCoreOutput.kv_transfer_params`: a prefill engine says where its saved KV is).
    # Optional: `load_params(req) -> object`, what the worker half needs to load `req`'s KV (a network transport:
    # where it is saved and under which key), plain data carried in `KVTransfer.params`. A connector without it
    # loads with params None (the in-host reference finds the KV by request id).
    # Optional: `save_params(req) -> object`, the same for a save (the key it is saved under).
    # Optional: `load_source(req) -> hashable` (where a load comes from) and `load_limits` (a LoadLimits): the
    # bounds on loads in flight (module docstring); without them, loads are unbounded (the in-host reference's
    # finish as they start).
    # Optional: `trusted_loads: bool` (default True): False keeps loaded KV out of the prefix cache.
    # Optional: `bind(kv)`, called once with the scheduler's KV cache manager; `step_ops(evicted) -> object | None`,
    # a step's tier work for the prefix-cache evictions `evicted` ([(block id, hash)]) and whatever the connector
    # queued itself, run by the worker half before the step's forward (module docstring).


@dataclass(frozen=True)
class LoadLimits:
    """Bounds on a scheduler's loads in flight (module docstring)."""

    max_loads: int = 128
    max_per_source: int = 64
    max_block_fraction: float = 0.5  # of the pool's blocks
    max_per_client: int = 64  # by the widest name of `Request.client` (its host); anonymous: uncapped


def _client_of(req: Request) -> tuple:
    """Whom a load counts against: the widest name of `Request.client` (its host: a name a keyed caller vouches for
    is nested under it, engine/server/client_identity.py), so more connections or names from one host do not buy
    more loads; () anonymous (offline use)."""
    return tuple(getattr(req, "client", ())[:1])


class _InFlight(NamedTuple):
    transfer: KVTransfer
    request: Request | None  # a load's request; None for a save
    refs: list[int]  # the block ids the transfer holds a reference on


class KVTransfers:
    """The scheduler's KV-connector bookkeeping (module docstring). `kv`: the scheduler's KV cache manager."""

    HELD_POLL_S = 0.05  # how often held saves make an idle engine step (module docstring)

    def __init__(self, connector: KVConnector, kv) -> None:
        self.connector = connector
        self.kv = kv
        self._next_id = 0
        self._in_flight: dict[int, _InFlight] = {}  # by transfer id, until reported
        self.loading: dict[str, Request] = {}  # loads under way, by request id
        self.ready: deque[Request] = deque()  # loaded, to be admitted (they hold their blocks)
        self._watched: dict[str, Request] = {}  # saved once their prompt is computed
        self._new_loads: list[KVTransfer] = []  # for the next SchedulerOutput
        self.counters = KVTransferCounters()
        self._load_started: dict[int, float] = {}  # transfer id -> time.monotonic() at start_load
        self.limits: LoadLimits | None = getattr(connector, "load_limits", None)
        self._source_of = getattr(connector, "load_source", None)
        self._save_params = getattr(connector, "save_params", None)
        self.trusted_loads = getattr(connector, "trusted_loads", True)
        self._load_keys: dict[int, tuple] = {}  # transfer id -> (source, client, blocks held) of a load in flight
        self._by_source: Counter = Counter()
        self._by_client: Counter = Counter()
        self._load_blocks = 0
        self.loads_over_limit = 0  # requests computed here because a load would have passed a bound
        # Per-sequence state travels too (module docstring): the KV manager hands out state slots.
        self.moves_state = callable(getattr(kv, "state_slot", None))
        if not self.moves_state:
            self.chunk_limit = None
        # Saves held until read (module docstring); a state's slot is copied at save time, so never held.
        self.holds_saves = bool(getattr(connector, "holds_saves", False)) and not self.moves_state
        self._held: set[int] = set()  # transfer ids of held saves in flight
        self._held_polled = 0.0  # time.monotonic() of the latest step that awaited them
        bind = getattr(connector, "bind", None)
        if bind is not None:
            bind(kv)
        # Tier work fed by the prefix cache's evictions (module docstring); the pool records them only then.
        self._step_ops = getattr(connector, "step_ops", None)
        if self._step_ops is not None:
            kv.pool.evicted = []

    @property
    def num_holding(self) -> int:
        """Requests that hold blocks without running (loading, or loaded and not admitted yet)."""
        return len(self.loading) + len(self.ready)

    @property
    def busy(self) -> bool:
        """Transfers started and not reported yet; held saves only once per HELD_POLL_S (module docstring)."""
        return len(self._in_flight) > len(self._held) or self._held_due()

    def _held_due(self) -> bool:
        return bool(self._held) and time.monotonic() - self._held_polled >= self.HELD_POLL_S

    def holding(self) -> list[Request]:
        return list(self.loading.values()) + list(self.ready)

    def transfer_refs(self) -> list[int]:
        """Every block reference the transfers in flight hold (for the scheduler's invariant check)."""
        return [b for f in self._in_flight.values() for b in f.refs]

    # ------------------------------------------------------------------ requests
    def added(self, req: Request) -> None:
        if self.connector.wants_save(req):
            self._watched[req.request_id] = req

    def forget(self, req: Request) -> None:
        """A request finished (abort, stop, length): it is no longer watched, loading or ready. Its transfers in
        flight keep their block references until reported."""
        rid = req.request_id
        if self._watched.get(rid) is req:
            del self._watched[rid]
        if self.loading.get(rid) is req:
            del self.loading[rid]
        elif self.ready and any(r is req for r in self.ready):
            self.ready = deque(r for r in self.ready if r is not req)

    def finished_params(self, req: Request):
        """The connector's parameters for a request that just finished (its final output carries them), or None."""
        f = getattr(self.connector, "request_finished", None)
        params = None if f is None else f(req)
        if params is not None:
            self.counters.saves += 1
        return params

    def _moved_tokens(self, req: Request) -> int:
        """The prompt tokens a transfer moves: all of them, or all but the last with per-sequence state."""
        return req.num_prompt_tokens - 1 if self.moves_state else req.num_prompt_tokens

    def chunk_limit(self, req: Request, start: int, n: int) -> int:
        """`n` prompt tokens scheduled from `start`, ended at `n - 1` of the prompt for a request whose state is saved
        (module docstring); None (the attribute) for a model without per-sequence state."""
        if req.request_id not in self._watched:
            return n
        end = self._moved_tokens(req)
        return end - start if start < end < start + n else n

    def hit_usable(self, req: Request, num_hit: int) -> bool:
        """Whether a prefix hit of `num_hit` tokens leaves a watched request's save point (the prompt's n - 1) to a
        step of its own: a hit reaching it would leave no step ending there, so no slot holding that state (the
        scheduler then computes the prompt from its start; rare: n - 1 on a block boundary with a checkpoint)."""
        return req.request_id not in self._watched or num_hit < self._moved_tokens(req)

    def loadable(self, req: Request) -> int:
        k = min(max(self.connector.num_loadable_tokens(req), 0), req.num_tokens)
        if self.moves_state:  # the saved state is at the prompt's n - 1 (module docstring)
            k = min(k, req.num_prompt_tokens - 1)
        if k and self.limits is not None and not self._within_limits(req, k):
            self.loads_over_limit += 1
            return 0  # computed here: a load past a bound would hold blocks another request needs
        return k

    def _within_limits(self, req: Request, num_tokens: int) -> bool:
        lim = self.limits
        client = _client_of(req)
        blocks = self.kv.blocks_alone(num_tokens)
        return (len(self._load_keys) < lim.max_loads
                and self._by_source[self._source_of(req) if self._source_of else None] < lim.max_per_source
                and (not client or self._by_client[client] < lim.max_per_client)
                and self._load_blocks + blocks <= lim.max_block_fraction * self.kv.pool.num_blocks)

    def within_limits(self) -> bool:
        """The loads in flight are within their bounds (the scheduler's invariant check)."""
        return self.limits is None or len(self._load_keys) <= self.limits.max_loads

    def start_load(self, req: Request, num_hit: int, num_tokens: int) -> None:
        """`req` (fresh, its blocks for `num_tokens` just allocated, `num_hit` of them prefix hits) waits for
        the connector to load the rest."""
        bs = self.kv.block_size
        first = num_hit // bs
        params = getattr(self.connector, "load_params", None)
        t = self._transfer(req, num_tokens, first, (), None if params is None else params(req))
        if self.moves_state:  # its slot starts from the loaded state, not from a prefix hit's checkpoint
            self.kv.state_loaded(req.request_id)
        self._load_started[t.transfer_id] = time.monotonic()
        self._hold(t, req)
        if self.limits is not None:
            key = (self._source_of(req) if self._source_of else None, _client_of(req),
                   len(self._in_flight[t.transfer_id].refs))
            self._load_keys[t.transfer_id] = key
            self._by_source[key[0]] += 1
            self._by_client[key[1]] += 1
            self._load_blocks += key[2]
        req.status = RequestStatus.WAITING_FOR_KV
        self.loading[req.request_id] = req
        self._new_loads.append(t)

    def plan(self, scheduled: dict[str, int]) -> KVTransferPlan | None:
        """This step's transfers: the loads started while scheduling it, and a save for each watched request
        whose last prompt token this step computes (`scheduled`: the step's requests). None when nothing is
        started or awaited."""
        saves = []
        watched = self._watched
        if watched:
            # Whichever is smaller of the watched requests (not prefilled yet) and the step's.
            rids = [r for r in watched if r in scheduled] if len(watched) <= len(scheduled) else \
                [r for r in scheduled if r in watched]
            for rid in rids:
                req = watched[rid]
                n = self._moved_tokens(req)
                if req.status is RequestStatus.RUNNING and req.num_computed_tokens >= n:
                    del watched[rid]
                    if n == 0 or (self.moves_state and req.num_computed_tokens > n):
                        # A one-token prompt with state moves nothing (the decode side computes it); a step that
                        # ran past the save point leaves no slot holding that state: nothing is saved rather
                        # than a wrong state (the output then names no saved KV: the decode side computes it).
                        continue
                    t = self._transfer(req, n, 0, tuple(req.prompt_token_ids[:n]),
                                       None if self._save_params is None else self._save_params(req))
                    self._hold(t, None)
                    if self.holds_saves and getattr(t.params, "hold", True):  # (a SaveKey may say it is copied)
                        self._held.add(t.transfer_id)
                        self._held_polled = time.monotonic()  # its step polls; the next is HELD_POLL_S away
                    saves.append(t)
        loads, self._new_loads = self._new_loads, []
        if self._step_ops is not None:
            evicted, self.kv.pool.evicted = self.kv.pool.evicted, []
            ops = self._step_ops(evicted)
            if ops is not None:  # first: before this step's loads and forward write the evicted blocks
                self._next_id += 1
                t = KVTransfer(self._next_id, "", [], 0, params=ops)
                self._in_flight[t.transfer_id] = _InFlight(t, None, [])
                loads.insert(0, t)
        # Held saves are awaited once per HELD_POLL_S (module docstring); any step's poll may report them.
        held = 0
        if self._held_due():
            self._held_polled = time.monotonic()
            held = len(self._held)
        awaited = len(self._in_flight) - len(self._held) + held - len(loads) - sum(
            1 for t in saves if t.transfer_id not in self._held)
        if not (loads or saves or awaited):
            return None
        return KVTransferPlan(loads, saves, awaited)

    def take_report(self, done: dict[int, bool]) -> list[Request]:
        """Act on the transfers a worker reports ended; returns the requests whose load failed, which the
        scheduler recomputes (their own blocks are still held: it frees them)."""
        failed: list[Request] = []
        for tid, ok in done.items():
            f = self._in_flight.pop(tid, None)
            if tid in self._held and f is not None:  # a held save's hold ended: read, or released unread
                self._held.discard(tid)
                if ok:
                    self.counters.holds_read += 1
                else:
                    self.counters.holds_unread += 1
            self._held.discard(tid)
            started = self._load_started.pop(tid, None)
            self._load_ended(tid)
            if f is None:
                continue  # undone by a rewind already
            if started is not None:
                self.counters.load_wait_s += time.monotonic() - started
            self.kv.pool.free(f.refs)
            req = f.request
            if req is not None and self.loading.get(req.request_id) is req:
                del self.loading[req.request_id]
                if ok:
                    req.num_computed_tokens = min(f.transfer.num_tokens, req.num_tokens - 1)
                    self.counters.loads_ok += 1
                    self.counters.tokens_loaded += req.num_computed_tokens
                    # Usage's cached tokens count KV this engine did not compute, loaded ones too (as vLLM's):
                    # a client sees the handoff worked.
                    req.num_cached_tokens = req.num_computed_tokens
                    if not self.trusted_loads:  # nothing proved where this KV came from: its request's alone
                        self.kv.exclude_from_prefix_cache(req)
                    self.ready.append(req)
                else:
                    self.counters.loads_failed += 1
                    failed.append(req)
            self.connector.transfer_done(f.transfer, ok)
        return failed

    def counters_now(self) -> KVTransferCounters:
        """The cumulative counters, with the blocks held saves keep out of the pool now."""
        held = sum(len(self._in_flight[t].refs) for t in self._held if t in self._in_flight)
        return dataclasses.replace(self.counters, held_blocks=held)

    def fail_all(self) -> list[Request]:
        """Elastic EP rewind: every transfer in flight counts as failed (its worker state was reset)."""
        return self.take_report({tid: False for tid in list(self._in_flight)})

    # ------------------------------------------------------------------ helpers
    def _load_ended(self, tid: int) -> None:
        key = self._load_keys.pop(tid, None)
        if key is not None:
            source, client, blocks = key
            for counts, k in ((self._by_source, source), (self._by_client, client)):
                counts[k] -= 1
                if counts[k] <= 0:
                    del counts[k]
            self._load_blocks -= blocks

    def _transfer(self, req: Request, num_tokens: int, first_block: int, token_ids: tuple,
                  params=None) -> KVTransfer:
        self._next_id += 1
        full, sliding = self.kv.transfer_tables(req.request_id, -(-num_tokens // self.kv.block_size))
        slot = self.kv.state_slot(req.request_id) if self.moves_state else None
        return KVTransfer(self._next_id, req.request_id, full, num_tokens, first_block, sliding, token_ids, params,
                          -1 if slot is None else slot)

    def _hold(self, t: KVTransfer, req: Request | None) -> None:
        refs = t.block_ids[t.first_block:] + [b for b in t.sliding_block_ids[t.first_block:] if b >= 0]
        self.kv.pool.touch(refs)
        self._in_flight[t.transfer_id] = _InFlight(t, req, refs)


__all__ = ["KVConnector", "KVTransfers", "LoadLimits"]
