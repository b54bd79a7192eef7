"""The NIXL KV transport: the side channel of the TCP transport (handshake, request, exact-match claim, refusals;
engine/kv_transfer/server.py) on its socket, the KV bytes read by the decode rank with NIXL (UCX underneath: shared
memory / CMA on one host, TCP or RDMA between hosts, NVLink between GPUs), the library vLLM's NixlConnector, SGLang
and Dynamo move KV with.

A fetch, in order:
  1. the decode rank connects to the prefill rank's KV port and runs the handshake (engine/kv_transfer/auth.py) and
     the request (capability, layout, the prompt's token ids), exactly as over tcp;
  2. the prefill rank claims the entry. A save held in its cache (in place, below) is staged out now: exactly that
     request's rows copied to host memory, and the hold released at once (its blocks back in the pool before any
     byte leaves). Then, to a peer the deployment's KV secret authenticated, it registers those rows (and nothing
     else) with its NIXL agent and answers with the usual reply header plus `nixl`: its agent's name, its metadata
     for that one registration (base64; the UCX worker address and remote keys) and where the rows lie. To a peer
     no secret authenticated (loopback without one: any local process can complete the handshake) it sends the rows
     on the socket, as tcp does, and no NIXL metadata at all: UCX over TCP and shared memory checks no remote key at
     the target (measured: a READ or WRITE with a deregistered key, or at an address outside the registration by a
     client that skips NIXL's own descriptor check, still lands), so a key is given only to a deployment member;
  3. the decode rank checks the header against its own layout (wire.recv_saved, on `meta` tensors: nothing is
     allocated for a reply that does not fit) and posts one NIXL READ per group (a layer's tensors) straight into
     its own cache blocks (its cache registered once with its fetching agent, whose metadata never leaves it) or,
     where the cache cannot be read into (per-sequence state groups), into a host buffer it registered once and
     reuses, handing each group on as its READ completes while the later groups are still being read;
  4. the decode rank says "read" on the socket; the prefill rank then deregisters the rows (also when the socket
     closes or the reply deadline passes: a copy of one request is exposed to one peer for one fetch at most) and
     closes the connection, which the fetch waits for.

Agents: one per transport object (a rank's connector) and role, made on first use, named at random, with the UCX
backend and no listener thread of their own (metadata travels only over the side channel); UCX kept to the
interfaces the rank was told to use (engine/kv_transfer/ucx_net.py). A decode agent keeps the prefill agents it has
loaded (at most MAX_REMOTE_AGENTS, least recently used dropped), so later fetches from the same rank skip UCX's
connection set-up (measured: ~80 ms the first time, < 1 ms after).

In place (the default, `RemoteKVConfig.nixl_in_place`; engine/kv_transfer/nixl_inplace.py): a prefill rank does not
copy a save when it is made; it holds the request's blocks in its cache until a fetch claims them (step 2) or
`nixl_hold_s` passes, within bounds on what holds may keep out of the pool. Nothing of the cache is ever
registered with the serving agent.
"""
from __future__ import annotations

import base64
import contextlib
import importlib
import logging
import secrets
import socket
import threading
import time
import weakref
from collections import OrderedDict
from typing import Callable

import torch

from .auth import PeerAuth
from ..contract.kv_blocks import SavedKV
from .client import FetchTimeouts, request_kv
from .nixl_inplace import CacheRegions, HeldKV, deliver, read_held, reply_staged, stage
from .server import KVSocketServer, ServerLimits
from .store import SavedKVStore
from .ucx_net import narrowed_env
from .wire import Deadline, KVFetchError, Staging, recv_saved, send_header, send_saved, socket_take

logger = logging.getLogger(__name__)

MAX_REMOTE_AGENTS = 64  # prefill agents a decode agent keeps loaded (each holds a UCX endpoint)
# The UCX progress thread's poll timeout, in microseconds (NIXL rounds it up to whole milliseconds). The thread waits
# in poll() on its workers' event fds and wakes at once when a peer's message or a transfer arrives; the timeout only
# bounds an idle wake-up. NIXL's Python wrapper passes 0, which makes poll() return at once: the thread then spins a
# whole core for as long as the agent lives (measured: 3.0 s of CPU over 3 s idle, 0.07 s with this delay).
PROGRESS_DELAY_US = 1000
_POLL_S = 0.0002  # between polls of a READ in flight (the progress thread moves the bytes)
_NIXL_MODULES = ("nixl._api", "nixl_cu12._api", "nixl_cu13._api")  # the meta package, or a CUDA variant's own


def nixl_api():
    """NIXL's Python API module (`nixl_agent`, `nixl_agent_config`), or None when no NIXL wheel is installed."""
    for name in _NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def nixl_available() -> bool:
    return nixl_api() is not None


_AGENTS: "weakref.WeakSet[NixlAgent]" = weakref.WeakSet()  # every agent made in this process, for open_agents()
_CONFIG_SWAP = threading.Lock()  # one agent at a time built with the delayed progress thread's config


def _agent_with_progress_delay(api, name: str, conf, delay_us: int):
    """`api.nixl_agent(name, conf)` with the progress thread's poll timeout `delay_us` (PROGRESS_DELAY_US's why).

    nixl_agent's constructor sets `pthrDelay = 0` on the bindings' nixlAgentConfig it makes and offers no way to set
    it; for the constructor's duration the bindings' class is a subclass that keeps the delay at `delay_us` at
    least (a pybind class takes a Python subclass wherever it takes the class), restored before the lock is given
    back. Another thread building an agent meanwhile waits on the lock; NIXL's other users never see the swap
    outside an agent's construction."""
    bind = getattr(api, "nixlBind", None)
    base = getattr(bind, "nixlAgentConfig", None)
    if base is None:  # a NIXL whose wrapper no longer builds the config this way: its own default
        return api.nixl_agent(name, conf)

    try:
        class DelayedConfig(base):  # type: ignore[misc, valid-type]
            def __setattr__(self, attr: str, value) -> None:
                if attr == "pthrDelay":
                    value = max(int(value), delay_us)
                super().__setattr__(attr, value)
    except TypeError:  # bindings built with a final config class: NIXL's own default (a spinning thread)
        logger.warning("NIXL's agent config cannot be subclassed: the UCX progress thread keeps NIXL's 0 poll "
                       "timeout and spins a core while the agent lives")
        return api.nixl_agent(name, conf)

    with _CONFIG_SWAP:
        bind.nixlAgentConfig = DelayedConfig
        try:
            return api.nixl_agent(name, conf)
        finally:
            bind.nixlAgentConfig = base


def open_agents() -> list["NixlAgent"]:
    """The agents of this process not closed yet and still referenced (each holds a UCX worker and its thread)."""
    return [a for a in list(_AGENTS) if a.agent is not None]


class NixlAgent:
    """One NIXL agent with the UCX backend (module docstring), thread-safe (NIXL's strict sync mode: a rank's server
    threads and fetch thread share it), plus the host buffers it registered once for receiving."""

    def __init__(self, progress_thread: bool, net_devices: str | None = None) -> None:
        api = nixl_api()
        if api is None:
            raise KVFetchError("the NIXL KV transport needs the nixl package (pip install nixl-cu12)")
        self.name = "moelink-" + secrets.token_hex(8)
        # UCX's progress thread polls without sleeping: ~a core for as long as the agent lives, idle or not
        # (measured: a test process kept four of them spinning after its fetches). Only the side being read needs
        # it (over TCP, UCX emulates a remote READ with messages the target must progress); a reader progresses
        # its own worker each time wait() polls a transfer's state.
        conf = api.nixl_agent_config(enable_prog_thread=progress_thread, enable_listen_thread=False,
                                     backends=["UCX"], sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        with narrowed_env(net_devices):  # UCX listens on the interfaces it may use: only those asked (ucx_net.py)
            self.agent = _agent_with_progress_delay(api, self.name, conf, PROGRESS_DELAY_US)
        self.net_devices = net_devices
        _AGENTS.add(self)
        if "UCX" not in self.agent.backends:
            raise KVFetchError("NIXL's UCX backend did not start on this machine")
        self._lock = threading.Lock()
        self._remotes: OrderedDict[str, bytes] = OrderedDict()  # loaded prefill agents -> their metadata, LRU first
        self._turns: dict[str, threading.Lock] = {}  # per prefill agent: one fetch's reads at a time
        self._free: list[tuple[torch.Tensor, object]] = []  # registered receive buffers not in use
        self.regions = CacheRegions()  # KV caches registered once (nixl_inplace.py)
        self.num_staged_bytes = 0  # bytes READ into a host buffer rather than into the cache blocks

    def close(self) -> None:
        """Give the receive buffers and loaded peers back and drop the agent (its UCX worker and progress thread
        end with it); idempotent. A fetch still holding the agent keeps it alive until it returns."""
        with self._lock:
            agent, self.agent = self.agent, None
            free, self._free = self._free, []
            remotes, self._remotes = list(self._remotes), OrderedDict()
        if agent is None:
            return
        for region in self.regions.take_all():
            with contextlib.suppress(Exception):
                agent.deregister_memory(region.reg)
        for _, reg in free:
            with contextlib.suppress(Exception):
                agent.deregister_memory(reg)
        for name in remotes:
            with contextlib.suppress(Exception):
                agent.remove_remote_agent(name)

    def _live(self):
        agent = self.agent
        if agent is None:
            raise KVFetchError("the NIXL agent is closed (its KV transport was shut down)")
        return agent

    # ------------------------------------------------------------------ prefill side
    def expose(self, tensors: list[torch.Tensor]):
        """Register `tensors` (host memory) for remote reads; returns (registration, metadata bytes a peer loads to
        read them: this agent's connection info and their remote keys)."""
        reg = self._live().register_memory(tensors)
        return reg, self._live().get_partial_agent_metadata(reg, True)

    def register(self, descs: list[tuple[int, int, int, str]], mem: str):
        """Register memory regions (address, bytes, device id, "") of type `mem` once (a KV cache)."""
        return self._live().register_memory(self._live().get_reg_descs(descs, mem))

    def metadata(self, reg) -> bytes:
        """What a peer loads to read `reg`: this agent's connection info and the regions' remote keys."""
        return self._live().get_partial_agent_metadata(reg, True)

    def unexpose(self, reg) -> None:
        agent = self.agent
        if agent is not None:  # else closed: its registrations went with it
            agent.deregister_memory(reg)

    # ------------------------------------------------------------------ decode side
    def load_remote(self, name: str, meta: bytes) -> None:
        """Load (or update) a prefill agent's metadata; the least recently used past MAX_REMOTE_AGENTS is dropped.
        This agent's own name (one transport serving and fetching, as in-process tests do) reads locally."""
        if name == self.name:
            return
        with self._lock:
            if self._remotes.get(name) == meta:  # a cache registered once: nothing new to load
                self._remotes.move_to_end(name)
                return
        got = self._live().add_remote_agent(meta)
        got = got.decode() if isinstance(got, bytes) else got
        if got != name:
            raise KVFetchError(f"the prefill rank's NIXL metadata names agent {got!r}, its reply {name!r}")
        with self._lock:
            self._remotes[name] = meta
            self._remotes.move_to_end(name)
            stale = list(self._remotes)[:-MAX_REMOTE_AGENTS] if len(self._remotes) > MAX_REMOTE_AGENTS else []
            for old in stale:
                del self._remotes[old]
        for old in stale:
            self._live().remove_remote_agent(old)

    def turn(self, name: str, deadline: Deadline) -> threading.Lock:
        """The lock a fetch from prefill agent `name` holds while it loads that agent's metadata and reads: loading
        (partial) metadata again invalidates the agent's transfers in flight (NIXL 1.5: "remote agent was
        invalidated or re-registered during transfer"), so fetches from one prefill rank take turns, as the
        collective transport's do; fetches from different ranks run at once. Acquired here, within `deadline`."""
        with self._lock:
            lock = self._turns.setdefault(name, threading.Lock())
            if len(self._turns) > 4 * MAX_REMOTE_AGENTS:  # names of agents long gone (restarted engines)
                for old in [n for n, lk in self._turns.items() if n not in self._remotes and not lk.locked()]:
                    del self._turns[old]
                self._turns[name] = lock
        if not lock.acquire(timeout=max(deadline.left(), 0.0)):
            raise KVFetchError(f"{deadline.what}: timed out behind another fetch from the same prefill rank")
        return lock

    def forget_remote(self, name: str) -> None:
        if name == self.name:
            return
        with self._lock:
            known = self._remotes.pop(name, None) is not None
        if known:
            try:
                self._live().remove_remote_agent(name)
            except Exception:  # already gone: nothing to forget
                pass

    def take_buffer(self, nbytes: int, pin: bool) -> tuple[torch.Tensor, object]:
        """A registered host buffer of at least `nbytes` (registered once, reused fetch after fetch)."""
        with self._lock:
            fits = [i for i, (b, _) in enumerate(self._free) if b.numel() >= nbytes and b.is_pinned() == pin]
            if fits:
                return self._free.pop(min(fits, key=lambda i: self._free[i][0].numel()))
        buf = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8, pin_memory=pin)
        return buf, self._live().register_memory([buf])

    def give_buffer(self, buf: torch.Tensor, reg) -> None:
        with self._lock:
            self._free.append((buf, reg))
            self._free.sort(key=lambda br: -br[0].numel())
            extra = self._free[4:]
            del self._free[4:]
        for _, r in extra:
            self._live().deregister_memory(r)

    def read_descs(self, remote: str, local: list[tuple[int, int]], local_mem: tuple[str, int],
                   far: list[tuple[int, int]], far_mem: tuple[str, int]):
        """Post one READ of the remote regions `far` into the local ones `local` (address, bytes; each side's
        (memory type, device id)); both sides' regions lie in memory their agents registered."""
        local_descs = self._live().get_xfer_descs([(a, n, local_mem[1]) for a, n in local], local_mem[0])
        remote_descs = self._live().get_xfer_descs([(a, n, far_mem[1]) for a, n in far], far_mem[0])
        handle = self._live().initialize_xfer("READ", local_descs, remote_descs, remote)
        if self._live().transfer(handle) == "ERR":
            handle.release()
            raise KVFetchError("NIXL refused to start a KV read")
        return handle

    def wait(self, handle, deadline: Deadline) -> None:
        """Until `handle`'s transfer is done; KVFetchError when it fails or `deadline` passes (the transfer is
        released, which aborts it, before this returns: the prefill rank may deregister its memory after)."""
        try:
            while (state := self._live().check_xfer_state(handle)) == "PROC":
                deadline.left()
                time.sleep(_POLL_S)
            if state != "DONE":
                raise KVFetchError(f"{deadline.what}: the NIXL read failed ({state})")
        finally:
            handle.release()


def _send_for_nixl_read(agent_of, store: SavedKVStore, authenticated: bool) -> Callable:
    """The server's ok reply (KVSocketServer's `reply`; module docstring). A held save is staged out of the cache
    first and its hold released at once. To a peer the deployment's KV secret authenticated, the rows are registered
    for this fetch only and named in the header (nixl_inplace.reply_staged); to any other peer (loopback without a
    secret: any local process may complete the handshake) they go on the socket, as over tcp: such a peer never
    gets a NIXL key to this process's memory, since UCX over TCP and shared memory does not check one at the target
    (docs/security-kv.md)."""

    def reply(conn: socket.socket, saved: SavedKV, query: dict, deadline: Deadline) -> None:
        if isinstance(saved, HeldKV):
            held = saved
            try:
                saved = stage(held)
            finally:
                store.release(held)  # the blocks go back before any byte leaves: no peer can reach them
        if not authenticated:
            send_saved(conn, saved, query, deadline)
            return
        reply_staged(conn, agent_of(), saved, deadline)

    return reply


class NixlKVServer(KVSocketServer):
    """A server of `store` on exactly (host, port) whose replies are read with NIXL (module docstring)."""

    def __init__(self, store: SavedKVStore, host: str, port: int, agent: "NixlAgent", limits: ServerLimits,
                 auth: PeerAuth | None = None) -> None:
        from .tcp import bound_socket

        authenticated = auth is not None and bool(getattr(auth, "authenticated", False))
        super().__init__(store, bound_socket(host, port), _send_for_nixl_read(lambda: agent, store, authenticated),
                         limits, auth)


def nixl_fetch(agent: NixlAgent, host: str, port: int, key: str, layout: tuple, token_ids: list[int],
               max_blocks: int, connect_timeout_s: float, timeout_s: float, pin: bool = False, on_group=None,
               auth: PeerAuth | None = None, first_byte_s: float = FetchTimeouts.first_byte_s) -> SavedKV:
    """The KV saved under `key` on (host, port) for exactly `token_ids`, read with NIXL into host memory (pinned when
    `pin`), each group handed to `on_group` once read while the later ones are still on their way; KVFetchError
    (with the reason) on anything short of all of it within `timeout_s`."""
    where = f"fetching KV from {host}:{port} over NIXL"
    deadline = Deadline(timeout_s, where)
    try:
        with socket.create_connection((host, port), timeout=min(connect_timeout_s, deadline.left())) as sock:
            reply = request_kv(sock, where, key, layout, token_ids, deadline, first_byte_s, auth,
                               max_blocks=max_blocks)
            if reply.get("ok") is not True:
                raise KVFetchError(f"{host}:{port} refused: {reply.get('error', 'no reason given')}")
            if "nixl" not in reply:  # a peer not authenticated by the secret: the bytes follow on the socket
                staging = Staging(pin, reuse=on_group is not None)
                try:
                    return recv_saved(socket_take(sock, deadline, staging), reply, layout, max_blocks, token_ids,
                                      on_group)
                finally:
                    staging.release()
            # Every shape checked against this rank's layout and `max_blocks` before a byte is allocated or read.
            plan = recv_saved(lambda shape: torch.empty(shape, dtype=torch.uint8, device="meta"), reply, layout,
                              max_blocks, token_ids)
            nixl = reply.get("nixl")
            if not isinstance(nixl, dict) or not isinstance(nixl.get("agent"), str) \
                    or not isinstance(nixl.get("meta"), str) or "tables" not in nixl:
                raise KVFetchError("a NIXL reply without its agent's name, metadata and blocks")
            groups = read_held(agent, nixl, plan, on_group, deadline, pin)
            send_header(sock, {"read": True}, deadline)
            deadline.left(sock)
            sock.recv(1)  # the server's close: it has deregistered the rows (a fetch leaves nothing exposed)
            return SavedKV(plan.num_tokens, plan.token_ids, plan.layout, groups)
    except KVFetchError:
        raise
    except TimeoutError:
        raise KVFetchError(f"{where}: timed out") from None
    except Exception as exc:  # a socket error, or NIXL's own (nixlBind's exceptions): the load fails, never raises on
        raise KVFetchError(f"{where}: {exc}") from None


__all__ = ["MAX_REMOTE_AGENTS", "NixlAgent", "NixlKVServer", "nixl_api", "nixl_available", "nixl_fetch", "open_agents"]
