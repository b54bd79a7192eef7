"""The offload tiers beside a prefill/decode connector on one engine: an engine takes one KV connector
(`EngineArgs.kv_connector`), so `WithOffload` is one factory over two, the disaggregation connector (`pd`: the
remote one, engine/kv_transfer/remote.py, or the in-host reference) and the offload tiers (engine/kv_transfer/
offload.py).

    llm = LLM(model, kv_connector=WithOffload(RemoteKVConnector(cfg, "kv_producer"), OffloadKVConnector(tiers)))
    # or: moelink serve MODEL --role prefill --kv-port 5600 --kv-offload-host-bytes N

Who does what, per request: the PD connector first. A request it can load (a decode server's request that names
its prefill server) loads from there; when this engine's tiers hold a leading part of its prompt beyond the device
prefix cache's hit (a shared system prompt the decode server evicted), that part is loaded from the tiers and only
the rest from the prefill server: one transfer split in two (`SplitLoad`), the tiers' blocks first, the remote
fetch writing from the block after them, reported done when both halves are (failed if either failed: the request
is recomputed). Not for a cache with per-sequence state (the state travels with the remote load, at the prompt's
end). Any other request (every request of a prefill server, a decode server's own) loads the prefix the tiers hold. Saves, the finished
request's parameters, the bounds on loads in flight and whether loaded KV is trusted are the PD connector's; the
evictions' tier work is the tiers'. Transfers are told apart by their parameters (the tiers' are `StepOps` and
`LoadPlan`), so each half hears only its own. A prefill server thus keeps prefixes it evicted (multi-turn chats,
shared system prompts) and loads them back before computing the rest, then saves the whole prompt for the decode
server as before.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from moelink.scheduler.outputs import KVTransfer
from moelink.scheduler.request import Request

from .offload import OffloadKVConnector
from .offload_tiers import LoadPlan, StepOps

_TIERS = (StepOps, LoadPlan)
_FROM_TIERS = ("offload",)  # the source a tier load counts against (LoadLimits)


@dataclass(frozen=True)
class SplitLoad:
    """One PD request's load split in two (module docstring): `tier` (a LoadPlan) for the blocks from the transfer's
    first block on, then `pd` (the PD connector's params) for the rest."""

    tier: LoadPlan
    pd: Any

    def parts(self, t: KVTransfer) -> tuple[KVTransfer, KVTransfer]:
        """`t` as each half sees it: the tiers' from t.first_block, the PD connector's after the tiers' blocks."""
        return (replace(t, params=self.tier),
                replace(t, params=self.pd, first_block=t.first_block + self.tier.num_full_blocks))


class WithOffload:
    """A PD connector factory and the offload tiers' as one (module docstring)."""

    def __init__(self, pd, offload: OffloadKVConnector) -> None:
        self.pd, self.offload = pd, offload

    @property
    def keys_kv_by_cache_salt(self) -> bool:  # both halves must (engine/config/lora.py)
        return getattr(self.pd, "keys_kv_by_cache_salt", False) is True and self.offload.keys_kv_by_cache_salt

    def __getattr__(self, name):  # the PD connector's factory attributes (name, kv_role, check_params, ...)
        if name in ("pd", "offload"):
            raise AttributeError(name)
        return getattr(self.pd, name)

    def for_tensor_parallel(self, tp_size: int, num_kv_heads: int, states: bool = False,
                            world_size: int = 1) -> "WithOffload":
        """Both halves bound to the engine's TP layout (EngineArgs at -tp > 1): the PD connector's maps heads
        between engines, the tiers' join their group's reports; a PD connector without a TP binding is refused."""
        bind = getattr(self.pd, "for_tensor_parallel", None)
        if not callable(bind):
            raise ValueError(f"kv_connector={type(self.pd).__name__} (beside the offload tiers) is not supported with "
                             f"tensor_parallel_size={tp_size}: it moves no head shards.")
        return WithOffload(bind(tp_size, num_kv_heads, states=states, world_size=world_size),
                           self.offload.for_tensor_parallel(tp_size, num_kv_heads, states, world_size))

    def configure(self, engine_config) -> None:
        self.offload.configure(engine_config)

    def offload_tier_stats(self):
        return self.offload.offload_tier_stats()

    def observe_offload_loads(self, observer) -> None:
        self.offload.observe_offload_loads(observer)

    def retain_scheduler_sides(self, sides: list) -> None:
        self.offload.retain_scheduler_sides(sides)

    def tier_index(self, rank: int):
        return self.offload.tier_index(rank)

    def scheduler_side(self, rank: int) -> "_SchedulerSide":
        return _SchedulerSide(self.pd.scheduler_side(rank), self.offload.scheduler_side(rank))

    def worker_side(self, rank: int) -> "_WorkerSide":
        return _WorkerSide(self.pd.worker_side(rank), self.offload.worker_side(rank))

    def __deepcopy__(self, memo) -> "WithOffload":
        return self  # both halves meet here in one process, as each connector's own do


class _SchedulerSide:
    def __init__(self, pd, tiers) -> None:
        self.pd, self.tiers = pd, tiers
        self._tier_loads: set[str] = set()  # request ids the tiers answered for this step
        self._split: set[str] = set()  # PD requests whose leading blocks the tiers load (SplitLoad)
        self._states = False  # a cache with per-sequence state: no split loads (bind)
        for name in ("load_limits", "trusted_loads", "holds_saves"):
            if hasattr(pd, name):
                setattr(self, name, getattr(pd, name))
        for name in ("request_finished", "save_params"):
            if callable(getattr(pd, name, None)):
                setattr(self, name, getattr(pd, name))

    def bind(self, kv) -> None:
        self.tiers.bind(kv)
        self._states = callable(getattr(kv, "state_slot", None))
        if callable(getattr(self.pd, "bind", None)):
            self.pd.bind(kv)

    def step_ops(self, evicted):
        self._tier_loads.clear()
        return self.tiers.step_ops(evicted)

    def num_loadable_tokens(self, req: Request) -> int:
        n = self.pd.num_loadable_tokens(req)
        if n:
            self._tier_loads.discard(req.request_id)
            self._split.discard(req.request_id)
            if not self._states and 0 < self.tiers.num_loadable_tokens(req) < n:
                self._split.add(req.request_id)  # the tiers' leading blocks, then the rest from the PD source
            return n
        n = self.tiers.num_loadable_tokens(req)
        if n:
            self._tier_loads.add(req.request_id)
        return n

    def _from_tiers(self, req: Request) -> bool:
        return req.request_id in self._tier_loads

    def load_params(self, req: Request):
        if self._from_tiers(req):
            return self.tiers.load_params(req)
        f = getattr(self.pd, "load_params", None)
        pd = None if f is None else f(req)
        if req.request_id in self._split:
            self._split.discard(req.request_id)
            return SplitLoad(self.tiers.load_params(req), pd)  # (a plan of no slots: the PD source loads it all)
        return pd

    def load_source(self, req: Request):
        if self._from_tiers(req):
            return _FROM_TIERS
        f = getattr(self.pd, "load_source", None)
        return None if f is None else f(req)

    def wants_save(self, req: Request) -> bool:
        return self.pd.wants_save(req)

    def transfer_done(self, t: KVTransfer, ok: bool) -> None:
        if isinstance(t.params, SplitLoad):
            tier_t, pd_t = t.params.parts(t)
            self.tiers.transfer_done(tier_t, ok)  # its slots unpinned, its hit counted when ok
            self.pd.transfer_done(pd_t, ok)
            return
        (self.tiers if isinstance(t.params, _TIERS) else self.pd).transfer_done(t, ok)


class _WorkerSide:
    def __init__(self, pd, tiers) -> None:
        self.pd, self.tiers = pd, tiers
        # SplitLoad transfers in flight: transfer id -> the halves' reports so far ([ok, ...]); reported at two.
        self._joins: dict[int, list[bool]] = {}

    def start_load(self, t: KVTransfer, kv) -> None:
        if isinstance(t.params, SplitLoad):
            tier_t, pd_t = t.params.parts(t)
            self._joins[t.transfer_id] = []
            # Disjoint blocks: the tiers' from first_block, the fetch's after them; each on its own thread.
            if tier_t.params.host_slots:
                self.tiers.start_load(tier_t, kv)
            else:
                self._joins[t.transfer_id].append(True)  # nothing from the tiers after all
            self.pd.start_load(pd_t, kv)
            return
        (self.tiers if isinstance(t.params, _TIERS) else self.pd).start_load(t, kv)

    def start_save(self, t: KVTransfer, kv) -> None:
        self.pd.start_save(t, kv)

    def poll(self) -> dict[int, bool] | None:
        done: dict[int, bool] = {}
        for half in (self.pd.poll() or {}, self.tiers.poll() or {}):  # ids are one scheduler's: disjoint but splits
            for tid, ok in half.items():
                parts = self._joins.get(tid)
                if parts is None:
                    done[tid] = ok
                    continue
                parts.append(ok)
                if len(parts) == 2:
                    del self._joins[tid]
                    done[tid] = all(parts)
        return done or None

    def drop_pending(self) -> None:
        self.pd.drop_pending()
        self.tiers.drop_pending()
        self._joins.clear()

    def close(self) -> None:
        try:
            self.pd.close()
        finally:
            self.tiers.close()


__all__ = ["SplitLoad", "WithOffload"]
