"""The remote KV connector: a prefill engine and a decode engine, in separate processes or hosts, move a
request's prompt KV over a named transport (engine/kv_transfer/transport.py: "tcp", or "shm" on one host).

    # prefill process: rank r serves the KV it saved on port + r of 127.0.0.1
    conn = RemoteKVConnector(RemoteKVConfig(port=5600))
    llm = LLM(model, kv_connector=conn)
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1,
                                                   kv_transfer_params=KVTransferParams(do_remote_decode=True)))
    params = [o.kv_transfer_params for o in outputs]            # where each prompt's KV is, and its capability

    # decode process: fetches it instead of prefilling
    llm = LLM(model, kv_connector=RemoteKVConnector(RemoteKVConfig()))  # no port: serves nothing
    llm.generate(prompts, [SamplingParams(max_tokens=64, kv_transfer_params=p) for p in params])

Scheduler half (driver): a request whose `SamplingParams.kv_transfer_params` says `do_remote_decode` is saved once
its prompt is computed; one that says `do_remote_prefill` loads its whole prompt's KV (the scheduler then
computes only the last prompt token, for its logits), and the load carries where from (`RemoteSource`, in
`KVTransfer.params`). Worker half (each rank): a save copies the blocks to host memory into the rank's bounded
store (engine/kv_transfer/store.py: dropped once fetched, after `ttl_s`, or oldest first past
`max_saved_bytes`), which the transport serves (over NIXL, by default, a request that asked for the handoff itself
has its blocks held in the cache instead, within bounds, until a fetch claims them and they are staged out, or
`nixl_hold_s` passes: engine/kv_transfer/nixl_inplace.py); a load
fetches on a thread of its own (the step loop goes on) that writes each layer's blocks as they arrive (engine/kv_transfer/arrival.py) into the request's blocks,
reserved by the scheduler since the load began, and the rank's first `poll` after the last has landed reports it.
A save's copy to host memory is asynchronous on a GPU (`PagedKVBlocks.read_async`, a side stream): the store
announces its key at once and serves it when the poll that finds the copy done puts it there. Anything short of
a load (the prefill engine gone, mid-fetch or before; nothing under the key; another layout or other tokens;
`fetch_timeout_s` passed) reports the load failed: the scheduler frees the blocks and recomputes the request.
The reason is logged and kept (`WorkerKVStats.failures`).

Security (docs/security-kv.md): each save is keyed by a fresh capability the scheduler half issues
(`save_params`) and only that request's output carries (`remote_kv_token`); a fetch needs it and the exact
prompt, and both sides bind the key to their request's cache salt (auth.salted_key: its images, its adapter). Requests naming a source outside `RemoteKVConfig.peers` are refused when added (`check_params`), before
any connection; loads are capped per source and in all (scheduler/kv_connector.py) and never hold a sequence
slot; a decode engine without the deployment secret does not register loaded KV for prefix reuse
(`trusted_loads`: nothing proved where it came from).

Tensor parallelism (engine/kv_transfer/tp_shard.py): EngineArgs binds the factory to the engine's TP layout
(`for_tensor_parallel`); each rank then saves or loads its own kv heads, a save's output names its TP group's
ports (`remote_ranks` = the group's size) and its token says the group's size, and the group's reports are joined
on its first rank (engine/kv_transfer/tp_join.py).

The worker half lives in engine/kv_transfer/remote_worker.py (`RemoteWorkerSide`); this module is the factory and
the scheduler half. The factory holds only this config, so it pickles to Ray ranks: each builds its own server and store there (the
config carries the secret to them: Ray's own transport must be as trusted as the hosts).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import secrets
from collections import OrderedDict

from moelink.engine.contract.kv_transfer_params import MAX_MM_HASHES, KVTransferParams
from moelink.engine.contract.safe_text import shown
from moelink.scheduler.kv_connector import LoadLimits
from moelink.scheduler.outputs import KVTransfer
from moelink.scheduler.request import Request

from .auth import new_capability, salted_key
from .config import WILDCARD_HOSTS, RemoteKVConfig, RemoteSource, SaveKey
from .peers import describe_peers, peer_allowed
from .remote_worker import RemoteWorkerSide, WorkerKVStats
from .tp_shard import KVShardSpec, save_token, token_tp_size

logger = logging.getLogger(__name__)


class RemoteKVConnector:
    """The factory (engine/contract/kv_connector.py) for both roles; which requests save or load is per request
    (`SamplingParams.kv_transfer_params`)."""

    name = "MoelinkRemoteKVConnector"  # what GetServerInfo reports as kv_connector
    # A save and a fetch are keyed by auth.salted_key(capability, cache salt): KV never crosses adapters or images
    # (engine/config/lora.py lets LoRA run with it for this).
    keys_kv_by_cache_salt = True

    def __init__(self, config: RemoteKVConfig | None = None, kv_role: str | None = None) -> None:
        self.config = config or RemoteKVConfig()
        # vLLM's kv_role, reported to routers: by default an engine with a port serves saved KV ("kv_producer"),
        # one without only loads ("kv_consumer"); a server that does both says "kv_both".
        self.kv_role = kv_role or ("kv_producer" if self.config.port is not None else "kv_consumer")
        _check(self.kv_role in ("kv_producer", "kv_consumer", "kv_both"), "kv_role", self.kv_role,
               "must be kv_producer, kv_consumer or kv_both")

        # The engine's TP layout (engine/kv_transfer/tp_shard.py), set by `for_tensor_parallel`; None: one rank
        # per scheduler, each holding every kv head.
        self.shard: KVShardSpec | None = None

    def for_tensor_parallel(self, tp_size: int, num_kv_heads: int, states: bool = False,
                            world_size: int = 1) -> "RemoteKVConnector":
        """This connector for an engine of `tp_size` ranks per TP group whose model has `num_kv_heads` kv heads
        (0: an MLA latent, whole on every rank) and, with `states`, per-sequence state groups (a hybrid model): a
        copy, with a fresh report channel per engine (engine/kv_transfer/tp_join.py). EngineArgs calls it when
        tensor_parallel_size > 1. A serving config's `num_ranks` below `world_size` (the engine's ranks: `-tp 2`
        alone is 2 ranks at expert_parallel_size 1, which is what `moelink serve` passes) is raised to it."""
        out = copy.copy(self)
        if self.config.port is not None and self.config.num_ranks < world_size:
            out.config = dataclasses.replace(self.config, num_ranks=world_size)
        out.shard = KVShardSpec(tp_size, num_kv_heads, secrets.token_hex(8), states)
        return out

    @property
    def _tp(self) -> int:
        return 1 if self.shard is None else self.shard.tp_size

    def scheduler_side(self, rank: int) -> "_SchedulerSide":
        """`rank`: the scheduler's (the TP group's, under TP: its ranks rank * tp + [0, tp))."""
        self._check_rank(rank * self._tp)
        return _SchedulerSide(self.config, rank, self._tp)

    def worker_side(self, rank: int) -> "RemoteWorkerSide":
        self._check_rank(rank)
        return RemoteWorkerSide(self.config, rank, self.shard, loads=self.kv_role != "kv_producer")

    def decode_params(self, saved: KVTransferParams) -> KVTransferParams:
        """What a decode engine's request needs to load the KV of `saved` (a request's output kv_transfer_params,
        which names only the rank that saved it) when that rank is not known: every rank's ports, asked in turn,
        and the same capability."""
        c = self.config
        if c.port is None:
            raise ValueError("RemoteKVConfig.port=None: this engine serves no saved KV, so no decode engine can "
                             "load from it; give it a port.")
        tp = token_tp_size(saved.remote_kv_token or "")  # the prefill group's size, as its token says
        if tp > 1 and c.num_ranks != tp:
            raise ValueError(f"RemoteKVConfig.num_ranks={c.num_ranks} names more than one TP group of {tp} ranks: a "
                             "decode engine cannot tell the groups' ports apart; pass the request's output "
                             "kv_transfer_params (its group's ports) instead.")
        return KVTransferParams(do_remote_prefill=True, remote_host=c.reachable_host, remote_port=c.port,
                                remote_ranks=c.num_ranks, remote_request_id=saved.remote_request_id,
                                remote_kv_token=saved.remote_kv_token)

    def check_params(self, params: KVTransferParams | None) -> None:
        """ValueError (naming the field) for a request whose KV source is not one of this engine's peers: refused
        when the request is added (engine/core/input_processing.py), before any connection is made."""
        if params is None or not params.do_remote_prefill:
            return
        peers = self.config.peers
        if not peer_allowed(peers, params.remote_host, params.remote_port, params.remote_ranks):
            ports = (f"{params.remote_port}" if params.remote_ranks == 1
                     else f"{params.remote_port}-{params.remote_port + params.remote_ranks - 1}")
            raise ValueError(f"KVTransferParams.remote_host={shown(params.remote_host)} (ports {ports}) is invalid: "
                             f"this decode engine loads KV only from its configured peers (--kv-peers): "
                             f"{describe_peers(peers)}.")

    def describe(self) -> str:
        """One line on what this connector listens on and whom it trusts (a server's startup)."""
        c = self.config
        auth = "authenticated by the deployment's KV secret" if c.secret else "no KV secret (loopback only)"
        serves = ("serves no KV" if c.port is None else
                  f"serves saved KV on {c.host}:{c.port}" + (f"-{c.port + c.num_ranks - 1}" if c.num_ranks > 1 else ""))
        return (f"KV {c.transport}: {serves}; loads from peers: {describe_peers(c.peers)}; {auth}"
                + ("" if c.secret else "; loaded KV is not shared through the prefix cache") + ".")

    def _check_rank(self, rank: int) -> None:
        if self.config.port is not None and rank >= self.config.num_ranks:
            raise ValueError(f"RemoteKVConfig.num_ranks={self.config.num_ranks} is too small: rank {rank} serves on "
                             f"port + {rank}; set it to the engine's ranks (its expert_parallel_size, or "
                             f"its tensor_parallel_size without EP).")


def _params(req: Request) -> KVTransferParams | None:
    return getattr(req.sampling_params, "kv_transfer_params", None)


def _mm_hashes(req: Request) -> tuple[str, ...] | None:
    """A multimodal request's item hashes (engine/multimodal/inputs.MultimodalInputs: its images', then its
    videos'), hex, for its output: a decode request sent without the pixels fetches its KV under them (smg's PD
    mode, docs/multimodal.md); None for a text request."""
    mm = req.multimodal
    hashes = () if mm is None else tuple(h.hex() for h in (*mm.image_hashes, *mm.video_hashes))
    # Past the field's bound (a limit_mm_per_prompt above it) none are named: the decode leg must carry the pixels.
    return hashes if 0 < len(hashes) <= MAX_MM_HASHES else None


class _SchedulerSide:
    MAX_PENDING_CAPS = 1 << 16  # saves whose request has not finished yet (an abort may never finish one)

    def __init__(self, config: RemoteKVConfig, rank: int, tp_size: int = 1) -> None:
        self.config, self.rank, self.serves = config, rank, config.port is not None
        self.tp_size = tp_size  # ranks per TP group: this scheduler's ranks serve on port + rank * tp + [0, tp)
        self.load_limits = LoadLimits(config.max_loads, config.max_loads_per_source, config.max_load_block_fraction,
                                      config.max_loads_per_client)
        self.trusted_loads = config.secret is not None  # a handshake proved the source holds the secret
        # A save over NIXL in place is reported when read or expired (scheduler/kv_connector.py: a held save).
        # Not under TP: a rank's save is its heads' shard, copied (engine/kv_transfer/tp_shard.py).
        self.holds_saves = self.serves and config.transport == "nixl" and config.nixl_in_place and tp_size == 1
        self._caps: OrderedDict[str, str] = OrderedDict()  # request id -> the capability its save is under

    def num_loadable_tokens(self, req: Request) -> int:
        p = _params(req)
        return req.num_prompt_tokens if p is not None and p.do_remote_prefill else 0

    def load_params(self, req: Request) -> RemoteSource:
        p = _params(req)
        # The key bound to this request's salt (its images' hashes): a prefill save of other images is not found.
        return RemoteSource(p.remote_host, p.remote_port, p.remote_ranks, salted_key(p.remote_kv_token,
                            req.cache_salt), tuple(req.prompt_token_ids))

    def load_source(self, req: Request) -> tuple:
        """Which prefill engine a load comes from (scheduler/kv_connector.py's per-source cap)."""
        p = _params(req)
        return p.remote_host, p.remote_port

    def wants_save(self, req: Request) -> bool:
        p = _params(req)
        if p is None or not p.do_remote_decode:
            return False
        if not self.serves:
            logger.warning("request %s asks do_remote_decode, but this engine's RemoteKVConfig.port is None: its KV "
                           "is not saved (a decode engine will recompute it).", shown(req.request_id))
        return self.serves

    def save_params(self, req: Request) -> SaveKey:
        """A fresh capability for the save of `req` (the worker half stores it under that key), with whether it may
        be held in place (the request asked for the handoff itself) and whom a hold counts against."""
        p = _params(req)
        cap = self._caps[req.request_id] = save_token(new_capability(), self.tp_size)
        while len(self._caps) > self.MAX_PENDING_CAPS:
            self._caps.popitem(last=False)
        # Stored under the capability bound to the request's salt (auth.salted_key); the output names the capability.
        return SaveKey(salted_key(cap, req.cache_salt), hold=p is not None and not p.by_role_default,
                       client=tuple(req.client[:1]))

    def request_finished(self, req: Request) -> KVTransferParams | None:
        """A saved request's output says where its KV is: this rank's own port (no other rank to ask), or under TP
        its group's ports (each rank holds its heads: `remote_ranks` = the group's size), and the capability it is
        saved under."""
        cap = self._caps.pop(req.request_id, None)
        p = _params(req)
        if cap is None or p is None or not p.do_remote_decode or not self.serves \
                or req.num_computed_tokens < req.num_prompt_tokens:
            return None  # not saved: not asked to, nowhere to serve it, or ended before its prompt was computed
        return KVTransferParams(do_remote_prefill=True, remote_host=self.config.reachable_host,
                                remote_port=self.config.port + self.rank * self.tp_size, remote_ranks=self.tp_size,
                                remote_request_id=req.request_id, remote_kv_token=cap, mm_hashes=_mm_hashes(req))

    def transfer_done(self, transfer: KVTransfer, ok: bool) -> None:
        pass  # the worker half counts and logs; the scheduler recomputes a failed load


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"RemoteKVConfig.{name}={shown(value)} is invalid: {allowed}.")


__all__ = ["RemoteKVConfig", "RemoteKVConnector", "RemoteSource", "RemoteWorkerSide", "WILDCARD_HOSTS",
           "WorkerKVStats"]
