"""The KV offload connector (issue 47 item 2): prefix-cache blocks the device pool evicts are copied to host
memory, then pushed down to a disk file, and a request whose prefix a tier holds loads those blocks back,
asynchronously, instead of recomputing them. docs/kv-offload.md is the user's view.

    llm = LLM(model, kv_connector=OffloadKVConnector(OffloadConfig(host_bytes=8 << 30)))
    # or: moelink serve MODEL --kv-offload-host-bytes 8589934592 [--kv-offload-disk-bytes N --kv-offload-dir D]

Through the KV connector seam (scheduler/kv_connector.py), split as the seam splits every connector:

- the scheduler half (`_SchedulerSide`, one per rank, on the driver) owns the index (offload_tiers.py
  `TierIndex`: the LRU of keys per tier and their slots) and decides every store, load, push-down and drop. Fed
  by the device pool's evictions: each step, the blocks the pool handed out while still cached
  (`BlockPool.evicted`) get host slots, and the step's tier work (`StepOps`: push-downs, then device -> host
  copies) runs on the worker before the step's forward writes those blocks. Keys are the prefix cache's own block
  hashes, so asking costs dictionary lookups on hashes the scheduler computed already.
- a fresh request whose leading blocks the device prefix cache has, followed by blocks a tier has, loads the
  latter (`num_loadable_tokens`, `load_params`: a `LoadPlan` of pinned slots; not when the tiers add only the
  block holding the last prompt token, which its step recomputes anyway); it waits in WAITING_FOR_KV like a
  disaggregated decode request, its blocks held, while other requests keep stepping; when the load is reported it
  is admitted with those tokens computed (all but the last prompt token, whose logits it needs). A failed load is
  recomputed; an aborted one frees its blocks when the load is reported, its slots unpinned then.
- the worker half (offload_worker.py `TierWorkerSide`, one per rank, in the rank's process) only moves bytes
  (offload_store.py `TierStore`: host slots allocated once, pinned on CUDA; one disk file): the step's tier work
  inline (before the forward), loads one after another on the rank's loader thread (disk -> host -> device; on
  CUDA on a side stream that first waits for the work enqueued so far), each reported at the first poll after it
  ends.

The factory holds only the config, so it pickles to Ray workers (expert parallelism): each rank allocates its
own tiers and its scheduler half decides for it. The scheduler half needs one block's bytes (to count slots):
in one process the worker half tells the factory after the first step (a step's tier work goes out with the
first schedule to make the worker look at its cache); across processes the engine must call `configure(config)`
on the driver (from the model's config, engine/config/kv_sizing.py), until which nothing is offloaded.

A sliding-window table (scheduler/sliding_kv.py, gpt-oss) is served: its evicted blocks come to the tiers under
the pool's tagged hashes like any, and a load takes the full table's blocks after the device hit and the sliding
table's blocks the first recomputed token sees, shortened until the tiers hold that whole window (never a prefix
whose window is not restored); `LoadPlan.num_full` splits its slots between the tables, and its `first_block`
(the hit it was planned for) is checked by the worker.

Linear-attention state (scheduler/hybrid_cache.py, Qwen3-Next): a prefix hit resumes from the state checkpoint
after its last block, so when the pool evicts a block whose hash has a checkpoint on the device, the step's tier
work also copies that state into a host state slot (`states`: a TierIndex of its own, a quarter of the host
bytes, host only; key `state_key(block hash)`), and a load stops at a block whose state the host holds (and
before the last prompt token), the state written into the request's slot with the blocks. Blocks after the
device hit still cached there (a head without a checkpoint at its end) are copied up by the step's tier work and
loaded with the rest (`_staged`).

Under tensor parallelism (`for_tensor_parallel`, bound by EngineArgs at -tp N) a TP group has one scheduler, so one
scheduler half decides for the group, and every rank of it runs the same tier work on its own cache: its kv heads'
rows (GQA), or its whole copy of the latent (MLA, DSA's index keys, DeepSeek-V4's entries: whole on every rank, so
each rank's tier holds them too, as each rank's device cache does), or its heads' linear-attention state. Slots are
counted from one rank's bytes (`configure` reads the rank's sharded config, tensor_parallel.tp_local_config), the
same on every rank of the group, so a slot number means the same block on all of them; a transfer (a step's tier
work, a load) is reported to the scheduler once every rank of the group has it done, failed if any failed
(tp_join.py, the remote connector's report join): a load never admits a request while one rank's heads are
still being written.

Refused, with one line at start (`bind`): another cache policy with per-sequence state or tables of its own, and
a cache without prefix caching. PD: the engine takes one connector; offload_compose.py's `WithOffload` makes one of a
disaggregation connector and this one. Stats per tier
(`offload_tier_stats`, offload_tiers.py `TierStats`) and each load's seconds (`observe_offload_loads`) are what
engine/core/metrics.py reads.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import time
from typing import TYPE_CHECKING

from moelink.scheduler.block_pool import extend_block_hashes
from moelink.scheduler.sliding_kv import first_live_sliding_block, sliding_block_hash
from moelink.scheduler.outputs import KVTransfer
from moelink.scheduler.request import Request

from .offload_tiers import TIERS, LoadPlan, OffloadConfig, StepOps, TierIndex, TierStats
from .offload_worker import TierWorkerSide
from .tp_shard import KVShardSpec

if TYPE_CHECKING:
    from moelink.scheduler.hybrid_cache import HybridCacheManager
    from moelink.scheduler.kv_cache_manager import KVCacheManager

logger = logging.getLogger(__name__)


def state_key(block_hash: bytes) -> bytes:
    """The tiers' key of the linear-attention state right after the block of `block_hash` (a state checkpoint,
    scheduler/hybrid_cache.py): tagged so it never meets a block's key."""
    return hashlib.sha256(b"moelink-offload-state" + block_hash).digest()


class OffloadKVConnector:
    """The factory (engine/contract/kv_connector.py): one `OffloadConfig`, a scheduler and a worker half per rank."""

    name = "offload"
    # A block's tier key is its prefix-cache hash, chained from the request's salted root (engine/config/lora.py).
    keys_kv_by_cache_salt = True

    def __init__(self, config: OffloadConfig) -> None:
        if not isinstance(config, OffloadConfig):
            raise ValueError(f"OffloadKVConnector(config={config!r}) is invalid: pass an OffloadConfig")
        config.check_machine()  # at start, before any weights load (each rank checks its own machine again)
        self.config = config
        self.block_bytes: int | None = None  # one block's bytes on a rank (configure, or a worker half in-process)
        self.state_bytes: int | None = None  # one slot's linear-attention state (0: none), known with block_bytes
        self._sides: dict[int, _SchedulerSide] = {}
        self._observer = None
        # The engine's TP layout (module docstring), set by `for_tensor_parallel`; None: a scheduler per rank.
        self.shard: KVShardSpec | None = None

    def for_tensor_parallel(self, tp_size: int, num_kv_heads: int, states: bool = False,
                            world_size: int = 1) -> "OffloadKVConnector":
        """This connector for an engine of `tp_size` ranks per TP group (EngineArgs calls it at -tp > 1): a copy
        whose worker halves join their group's reports on its first rank (tp_join.py, a fresh channel per engine).
        Every rank keeps its own tiers of its own cache, so the heads (`num_kv_heads`, `states`) need no mapping
        here; the signature is the remote connector's, which does map them."""
        if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
            raise ValueError(f"tensor_parallel_size={tp_size!r} is invalid for the KV offload tiers: must be an "
                             "integer >= 1.")
        out = OffloadKVConnector(self.config)
        out.shard = KVShardSpec(tp_size, num_kv_heads, secrets.token_hex(8), states) if tp_size > 1 else None
        return out

    @property
    def tp_size(self) -> int:
        return 1 if self.shard is None else self.shard.tp_size

    def configure(self, engine_config) -> None:
        """Learn one block's bytes from the engine's config (the driver; needed when the ranks are other
        processes): one rank's, from the config a rank of its TP group runs (its heads; a latent whole)."""
        from moelink.engine.config.kv_sizing import kv_cache_bytes_per_block, state_bytes_per_sequence
        from moelink.engine.tp.attention import tp_local_config

        tp = engine_config.parallel.tensor_parallel_size
        if tp != self.tp_size:
            raise ValueError(f"the KV offload connector is bound to tensor_parallel_size={self.tp_size} and the "
                             f"engine runs {tp}: pass the connector through EngineArgs (it binds it).")
        model = tp_local_config(engine_config.model, tp)
        self.state_bytes = state_bytes_per_sequence(model)
        self.block_bytes = kv_cache_bytes_per_block(model, engine_config.cache.block_size)

    def scheduler_side(self, rank: int) -> "_SchedulerSide":
        side = self._sides[rank] = _SchedulerSide(self, rank)
        return side

    def worker_side(self, rank: int) -> TierWorkerSide:
        return TierWorkerSide(self, rank)

    def retain_scheduler_sides(self, sides: list) -> None:
        """After an elastic regroup (engine/cluster/elastic.py): `sides` are the live schedulers' halves, in their
        new order (kept ones renumbered, rebuilt ones fresh); a lost scheduler's index and counters are dropped.
        A composed half (offload_compose.py) is read through its `tiers`."""
        live = [getattr(s, "tiers", s) for s in sides]
        self._sides = {i: s for i, s in enumerate(live) if isinstance(s, _SchedulerSide)}

    def tier_index(self, rank: int) -> TierIndex | None:
        """Rank `rank`'s index (None before its first step, or on a rank whose tiers are off)."""
        side = self._sides.get(rank)
        return None if side is None else side.index

    def offload_tier_stats(self) -> dict[str, TierStats]:
        """Per tier, the counters of every rank summed (engine/core/metrics.py). Under TP a scheduler half's index
        counts one rank's bytes and every rank of its group moved as many: its byte counters are scaled by the
        group's size (block counts are the group's, once)."""
        out = {tier: TierStats() for tier in TIERS}
        tp = self.tp_size
        for side in list(self._sides.values()):
            if side.index is not None:
                for tier in TIERS:
                    out[tier].add(side.index.stats[tier].scaled_bytes(tp))
        return out

    def observe_offload_loads(self, observer) -> None:
        """`observer(tier, seconds)` is called as each load is reported (on the engine's thread)."""
        self._observer = observer

    def __getstate__(self) -> dict:  # to a Ray worker: the config and what is known of the blocks, nothing live
        return {"config": self.config, "block_bytes": self.block_bytes, "state_bytes": self.state_bytes,
                "shard": self.shard, "_sides": {}, "_observer": None}

    def __deepcopy__(self, memo) -> "OffloadKVConnector":
        return self  # in one process the halves meet here (block_bytes)


class _SchedulerSide:
    """A rank's index and decisions (module docstring). On the engine thread."""

    def __init__(self, owner: OffloadKVConnector, rank: int) -> None:
        self.owner, self.rank = owner, rank
        self.kv: KVCacheManager | HybridCacheManager | None = None  # the scheduler's KV manager (bind)
        self.index: TierIndex | None = None
        self.states: TierIndex | None = None  # host slots of linear-attention state checkpoints (None: no such model)
        self._hybrid: HybridCacheManager | None = None  # the KV manager when it keeps per-sequence state
        self._probed = False
        self._resets = 0
        self._seq = 0
        self._window: int | None = None  # the sliding-window layers' window (sliding_kv.py), None: none
        # request id -> (device hit blocks, loadable blocks, the sliding table's first loaded entry)
        # (and the device blocks to copy up first, for a linear-attention model: num_loadable_tokens)
        self._asked: dict[str, tuple[int, int, int, list]] = {}
        self._staged: list[tuple[int, bytes, int]] = []  # (device block, key, host slot) for this step's tier work
        # seq -> (ops, saved keys, pushed-down keys, saved state keys)
        self._ops: dict[int, tuple[StepOps, list, list, list]] = {}
        self._loads: dict[int, tuple[list, float, bytes | None]] = {}  # seq -> (keys, start time, state key)
        self._warned = False

    # ------------------------------------------------------------------ seam capabilities
    def bind(self, kv) -> None:
        from moelink.scheduler.kv_cache_manager import KVCacheManager
        from moelink.scheduler.sliding_kv import SlidingKVCacheManager

        from moelink.scheduler.hybrid_cache import HybridCacheManager

        if callable(getattr(kv, "state_slot", None)) and not isinstance(kv, HybridCacheManager):
            raise ValueError(f"KV offload (--kv-offload-host-bytes) cannot serve this model: its cache policy "
                             f"{type(kv).__name__} keeps a per-sequence state the offload tiers do not key; run it "
                             "without offload.")
        if isinstance(kv, HybridCacheManager):
            self._hybrid = kv
        elif not isinstance(kv, SlidingKVCacheManager) and \
                type(kv).transfer_tables is not KVCacheManager.transfer_tables:
            raise ValueError(f"KV offload (--kv-offload-host-bytes) cannot serve this model: its cache policy "
                             f"{type(kv).__name__} keeps tables the offload tiers do not key; run it without offload.")
        if not kv.enable_prefix_caching:
            raise ValueError("KV offload (--kv-offload-host-bytes) needs prefix caching: drop "
                             "--no-enable-prefix-caching, or the offload flags.")
        self.kv = kv
        self._window = getattr(kv, "window", None) if isinstance(kv, SlidingKVCacheManager) else None
        self._resets = kv.pool.num_resets

    def _ready(self) -> bool:
        state_bytes = self.owner.state_bytes or 0
        if self.index is None and self.owner.block_bytes is not None and \
                (self._hybrid is None or self.owner.state_bytes is not None):
            cfg = self.owner.config
            try:
                host, disk = cfg.block_host_bytes(state_bytes).num_slots(self.owner.block_bytes)
            except ValueError as exc:
                if not self._warned:
                    logger.error("KV offload is off: %s", exc)
                    self._warned = True
                return False
            self.index = TierIndex(host, disk, self.owner.block_bytes)
            if self._hybrid is not None:
                n = cfg.num_state_slots(state_bytes)
                if n < 1:
                    logger.warning("KV offload saves no linear-attention state (a quarter of the host tier, %d "
                                   "bytes, holds none of %d bytes): its prefixes are recomputed",
                                   cfg.host_bytes // 4, state_bytes)
                else:
                    self.states = TierIndex(n, 0, state_bytes)
        if self.index is not None and self.kv.pool.num_resets != self._resets:
            self._resets = self.kv.pool.num_resets
            self.index.clear()  # the prefix cache was reset (the weights changed): the tiers' KV is stale too
            if self.states is not None:
                self.states.clear()
        return self.index is not None

    def step_ops(self, evicted) -> StepOps | None:
        """This step's tier work: the evicted blocks stored, pushes down queued by stores and load plans."""
        self._asked.clear()  # asked while this step was scheduled; its loads have their plans
        if not self._ready():
            if self._probed:
                return None
            self._probed = True  # the worker half looks at its cache once, and (in one process) says its bytes
            return StepOps(0, 0)
        keys, blocks, slots, state_keys, states = [], [], [], [], []
        for b, h, s in self._staged:  # a load planned this step reads them: copied up before the load starts
            keys.append(h)
            blocks.append(b)
            slots.append(s)
        self._staged = []
        for b, h in evicted:
            s = self.index.store(h)
            if s is not None:
                keys.append(h)
                blocks.append(b)
                slots.append(s)
            if self.states is not None:
                # The state checkpoint right after this block, if the device has one: a prefix ending here resumes
                # from it, and the block it needs is leaving the device now (hybrid_cache.py). Not after a
                # checkpoint this step's own saves took (it is gone from the map then): never a state being written.
                c = self._hybrid.checkpoint_slot(h)
                hs = None if c is None else self.states.store(state_key(h))
                if hs is not None:
                    state_keys.append(state_key(h))
                    states.append((c, hs))
        demote = self.index.take_demotes()
        if not (blocks or demote or states):
            return None
        self._seq += 1
        ops = StepOps(self._seq, self.index.block_bytes, demote, tuple(blocks), tuple(slots), tuple(states),
                      self.owner.state_bytes or 0)
        disk_slot_keys = {d: k for k, d in self.index.disk.items()}
        self._ops[self._seq] = (ops, keys, [disk_slot_keys[d] for _, d in demote if d in disk_slot_keys], state_keys)
        return ops

    def num_loadable_tokens(self, req: Request) -> int:
        if self.index is None or not self._ready():
            return 0
        bs = self.kv.block_size
        # Every full block: the last one too (the device cache never serves the block holding the last prompt
        # token, a tier may: the scheduler computes that token again for its logits, as after a PD load).
        hashes = extend_block_hashes(req.block_hashes, req.all_token_ids, bs, req.num_tokens // bs, self.kv.lookahead, root=req.cache_root)
        # The device hit as the scheduler takes it (a sliding table's shortens it to where its window is cached):
        # the load fills the table entries after it.
        hybrid = self._hybrid
        hit = (hybrid.peek_computed_blocks(req) if hybrid is not None else self.kv.get_computed_blocks(req))[1] // bs
        end = self.index.num_leading(hashes, hit)
        staged = []
        if hybrid is not None:
            # The state loaded is the one right after block `end`: it must exist (shortened until the tier holds
            # one), and `end` must stop before the last prompt token (computed for its logits after the state).
            # Blocks after the hit still cached on the device count too: the pool evicts a sequence's tail first,
            # so its head often stays there without a checkpoint at its end (the hit stops before it). They are
            # copied up to host slots by this step's tier work, before the load reads them (a round trip, where
            # the alternative is recomputing the whole prefix).
            cap = (req.num_prompt_tokens - 1) // bs
            on_device = self.kv.pool.find_cached_blocks(hashes, cap)
            end = hit
            while end < cap and (end < len(on_device) or hashes[end] in self.index):
                end += 1
            while end > hit and (self.states is None or state_key(hashes[end - 1]) not in self.states):
                end -= 1
            staged = [(on_device[i], hashes[i]) for i in range(hit, min(end, len(on_device)))
                      if hashes[i] not in self.index]
        first_sliding = end
        while self._window is not None and end > hit:
            # The sliding table must hold, from the tiers, every block the first recomputed token's query sees
            # (sliding_kv.first_live_sliding_block); its entries before that are freed before any step reads them.
            # Never a prefix whose window is not there: shortened until it is.
            first_sliding = max(hit, first_live_sliding_block(min(end * bs, req.num_tokens - 1), self._window, bs))
            if all(sliding_block_hash(h) in self.index for h in hashes[first_sliding:end]):
                break
            end -= 1
        if end <= hit or (end == hit + 1 and hit == (req.num_tokens - 1) // bs):
            # Nothing below, or only the block holding the last prompt token, whose tokens the step that computes
            # that token recomputes in the same forward for nearly nothing: a load would only add its wait.
            return 0
        self._asked[req.request_id] = (hit, end, first_sliding, staged)
        return end * bs

    def load_params(self, req: Request) -> LoadPlan:
        """The load's plan (pinned slots); one of no slots when the tiers cannot serve it after all (the worker half
        reports it failed and the request is recomputed)."""
        hit, end, first_sliding, staged = self._asked.pop(req.request_id)
        for b, h in staged:
            # Block b still holds h's KV: it was cached when asked, this step, and nothing of this step writes a
            # block before its tier work runs. A store that finds no slot leaves the key out: the plan then fails.
            s = self.index.store(h)
            if s is not None:
                self._staged.append((b, h, s))
        keys = req.block_hashes[hit:end]
        where = dict(first_block=hit)
        if self._window is not None:
            where.update(num_full=len(keys), sliding_first=first_sliding)
            keys = keys + [sliding_block_hash(h) for h in req.block_hashes[first_sliding:end]]
        self._seq += 1
        skey, splan = None, None
        if self._hybrid is not None:
            skey = state_key(req.block_hashes[end - 1])
            splan = self.states.plan_load([skey], self._seq)  # a host slot, pinned (the state tier has no disk)
            if splan is None:
                return LoadPlan(self._seq, ())
            where["state_slot"] = splan.host_slots[0]
        plan = self.index.plan_load(keys, self._seq, **where)
        if plan is None:
            if splan is not None:
                self.states.pin(splan.host_slots, -1)
            return LoadPlan(self._seq, ())
        self._loads[self._seq] = (keys, time.perf_counter(), skey)
        return plan

    def wants_save(self, req: Request) -> bool:
        return False  # fed by evictions, not written through at prefill

    def transfer_done(self, t: KVTransfer, ok: bool) -> None:
        p = t.params
        if isinstance(p, StepOps) and p.seq:
            ops, keys, demoted, state_keys = self._ops.pop(p.seq)
            self.index.ops_ended(ops, keys, demoted, ok)
            if ops.save_states:
                self.states.ops_ended(StepOps(p.seq, 0, save_slots=tuple(s for _, s in ops.save_states)),
                                      state_keys, (), ok)
        elif isinstance(p, StepOps) and ok and self.owner.block_bytes is None:
            logger.warning("KV offload is off on rank %d: its worker is another process and this engine did not "
                           "give the driver one KV block's bytes (OffloadKVConnector.configure(engine_config))",
                           self.rank)
        elif isinstance(p, LoadPlan) and p.host_slots:
            keys, t0, skey = self._loads.pop(p.seq)
            seconds = time.perf_counter() - t0
            self.index.load_ended(p, keys, ok, seconds)
            if skey is not None:
                self.states.load_ended(LoadPlan(p.seq, (p.state_slot,)), [skey], ok, 0.0)
            if ok and self.owner._observer is not None:
                self.owner._observer(p.tier, seconds)


__all__ = ["OffloadConfig", "OffloadKVConnector"]
