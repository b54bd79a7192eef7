"""KV transports between engines, one strategy object per choice, chosen by name (`RemoteKVConfig.transport`).

A transport does two things for the remote KV connector (engine/kv_transfer/remote.py): on a prefill rank it
serves that rank's saved-KV store (engine/kv_transfer/store.py) at an address, and on a decode rank it fetches
the KV saved under a key from such an address. The connector around it owns everything else: which requests
save and load, the store's bounds, the background fetch and its deadline, writing the blocks, reporting. Every
transport runs the same handshake (engine/kv_transfer/auth.py: `auth`, the deployment secret) and the same
request checks and bounds (engine/kv_transfer/server.py: `limits`; engine/kv_transfer/client.py: `first_byte_s`).

- "tcp" (engine/kv_transfer/tcp.py): one connection per fetch, JSON header and raw bytes; any two hosts, CPU
  tests. Binds only the host it is given.
- "shm" (engine/kv_transfer/shm.py): engines on one host; the same exchange over a Unix socket (mode 0600), the
  KV bytes in an anonymous shared-memory file whose descriptor travels with the reply.

- "collective" (engine/kv_transfer/collective.py): the tcp exchange on its socket, the bytes over a
  torch.distributed group of the two ranks: NCCL between GPU ranks, gloo on CPU.
- "nixl" (engine/kv_transfer/nixl.py): the tcp exchange on its socket, the bytes read by the decode rank out of
  a copy of exactly the claimed request's rows on the prefill rank, registered for that one fetch, with NIXL
  (UCX), when the deployment's KV secret authenticated the peer; over the socket otherwise. The default where the
  nixl package is installed (`default_transport`).

What another transport needs to be added here (CUDA IPC
between GPU ranks on one node): `serve` returns an object with `close()` that makes the store's entries
readable by key (as "nixl" does: its agent registers an entry's host rows and sends its metadata in the reply;
the key names the entry), and `fetch` returns a `SavedKV` in this rank's layout or
raises `KVFetchError` with the reason within the timeout. A transport that reads blocks in place (NIXL:
engine/kv_transfer/nixl_inplace.py) also has `hold_region(kv)`, the prefill rank's cache whose saves are held in
it until fetched (None where they cannot be), and on the decode side finds the rank's blocks and the load's block ids through
the connector's `on_group` (an ArrivalWriter) instead of returning host copies.
"""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Protocol

import torch

from ..contract.kv_blocks import SavedKV
from .auth import NO_SECRET, PeerAuth
from .client import FetchTimeouts
from .server import ServerLimits
from .store import SavedKVStore
from .shm import ShmKVServer, shm_fetch
from .tcp import TCPKVServer, tcp_fetch

if TYPE_CHECKING:
    from .nixl import NixlAgent


class KVServer(Protocol):
    address: tuple  # where it serves (host, port)

    def close(self) -> None: ...


class KVTransport(Protocol):
    """Serves saved KV on a prefill rank and fetches it on a decode rank (module docstring)."""

    def serve(self, store: SavedKVStore, host: str, port: int) -> KVServer: ...

    def fetch(self, host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
              timeout_s: float, device: torch.device, on_group=None) -> SavedKV:
        """The KV saved under `key` for this rank's `layout` and `token_ids` (at most `max_blocks` blocks per
        group), its rows where they are best written from into a cache on `device` (pinned host memory, a shared
        mapping, or `device` itself); with `on_group(g, idx, rows)` each group is handed over as it arrives and not
        kept (wire.recv_saved). Raises KVFetchError with the reason, always within `timeout_s`."""

    def close(self) -> None:
        """What the transport holds beyond its servers (NIXL's agents); after the connector closed its server."""


class TCPTransport:
    """`auth`: the handshake (both roles); `first_byte_s`: a fetch's handshake and reply header deadlines, and a
    server's deadline for a peer's handshake and request; `limits`: a server's bounds (default: ServerLimits with
    these deadlines)."""

    name = "tcp"

    def __init__(self, connect_timeout_s: float, io_timeout_s: float, auth: PeerAuth | None = None,
                 first_byte_s: float = FetchTimeouts.first_byte_s, limits: ServerLimits | None = None) -> None:
        self.connect_timeout_s, self.io_timeout_s = connect_timeout_s, io_timeout_s
        self.auth, self.first_byte_s = auth or NO_SECRET, first_byte_s
        self.limits = limits or ServerLimits(handshake_timeout_s=first_byte_s, io_timeout_s=io_timeout_s)

    def close(self) -> None:  # nothing beyond the servers, which close themselves
        pass

    def serve(self, store: SavedKVStore, host: str, port: int) -> KVServer:
        return TCPKVServer(store, host, port, limits=self.limits, auth=self.auth)

    def fetch(self, host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
              timeout_s: float, device: torch.device, on_group=None) -> SavedKV:
        return tcp_fetch(host, port, key, layout, token_ids, max_blocks, self.connect_timeout_s, timeout_s,
                         pin=device.type == "cuda", on_group=on_group, auth=self.auth, first_byte_s=self.first_byte_s)


class ShmTransport(TCPTransport):
    name = "shm"

    def serve(self, store: SavedKVStore, host: str, port: int) -> KVServer:
        return ShmKVServer(store, host, port, limits=self.limits, auth=self.auth)

    def fetch(self, host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
              timeout_s: float, device: torch.device, on_group=None) -> SavedKV:
        return shm_fetch(host, port, key, layout, token_ids, max_blocks, timeout_s, on_group, self.auth,
                         self.first_byte_s)


class CollectiveTransport(TCPTransport):
    """The TCP exchange, the bytes over a torch.distributed pair group: NCCL on a CUDA rank, gloo on CPU
    (engine/kv_transfer/collective.py). A server's device is the rank's current CUDA device when it has one; a
    fetch receives on the device of the cache it writes."""

    name = "collective"

    @staticmethod
    def _device():
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def serve(self, store: SavedKVStore, host: str, port: int) -> KVServer:
        from .collective import CollectiveKVServer

        return CollectiveKVServer(store, host, port, device=self._device(), limits=self.limits, auth=self.auth)

    def fetch(self, host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
              timeout_s: float, device: torch.device, on_group=None) -> SavedKV:
        from .collective import collective_fetch

        return collective_fetch(host, port, key, layout, token_ids, max_blocks, self.connect_timeout_s, timeout_s,
                                device, on_group, self.auth, self.first_byte_s)


class NixlTransport(TCPTransport):
    """The TCP exchange, the bytes read with NIXL (engine/kv_transfer/nixl.py). Two NIXL agents per transport object
    (a rank's connector), each made on first use: the serving one with UCX's progress thread (peers read from it,
    and over TCP the target must progress), the fetching one without (its waits progress it; the thread would poll
    a core for as long as the rank lives). close() ends both."""

    name = "nixl"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._agents: dict[bool, NixlAgent] = {}  # progress thread or not
        self._agent_lock = threading.Lock()
        # Where UCX may listen (engine/kv_transfer/ucx_net.py): the serving agent on the KV listener's host's
        # interface, the fetching one on those towards the allowed peers; set by `bind_hosts`, looked up when the
        # agent is made (on the rank's own machine). Unset: loopback only, as the defaults are.
        self.listen_host: str | None = "127.0.0.1"
        self.peer_hosts: tuple[str, ...] = ()

    def bind_hosts(self, listen_host: str | None, peer_hosts: tuple[str, ...]) -> None:
        """The KV listener's host (None: this rank serves nothing) and the peers it loads from (() loopback)."""
        self.listen_host, self.peer_hosts = listen_host, tuple(peer_hosts)

    def agent(self, serving: bool) -> NixlAgent:
        from .nixl import NixlAgent
        from .ucx_net import devices_for

        with self._agent_lock:
            if serving not in self._agents:
                devices = devices_for(self.listen_host or "127.0.0.1", None) if serving \
                    else devices_for(None, self.peer_hosts)
                self._agents[serving] = NixlAgent(progress_thread=serving, net_devices=devices)
            return self._agents[serving]

    def close(self) -> None:
        with self._agent_lock:
            agents, self._agents = list(self._agents.values()), {}
        for a in agents:
            a.close()

    def __getstate__(self) -> dict:  # a transport travels to Ray ranks as its settings; each rank makes its agents
        state = dict(self.__dict__)
        state["_agents"], state["_agent_lock"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._agent_lock = threading.Lock()

    def hold_region(self, kv):
        """`kv`'s saves held in place until fetched (nixl_inplace.HoldRegion: nothing of the cache is registered; a
        claimed save's rows are staged out for its one fetch), or None where they cannot be (the copy path)."""
        from .nixl_inplace import HoldRegion, in_place_ok

        return HoldRegion(kv) if in_place_ok(kv) is None else None

    def serve(self, store: SavedKVStore, host: str, port: int) -> KVServer:
        from .nixl import NixlKVServer

        return NixlKVServer(store, host, port, self.agent(serving=True), limits=self.limits, auth=self.auth)

    def fetch(self, host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
              timeout_s: float, device: torch.device, on_group=None) -> SavedKV:
        from .nixl import nixl_fetch

        return nixl_fetch(self.agent(serving=False), host, port, key, layout, token_ids, max_blocks,
                          self.connect_timeout_s, timeout_s, pin=device.type == "cuda", on_group=on_group,
                          auth=self.auth, first_byte_s=self.first_byte_s)


KV_TRANSPORTS = {"tcp": TCPTransport, "shm": ShmTransport, "collective": CollectiveTransport, "nixl": NixlTransport}


def default_transport() -> str:
    """"nixl" where the nixl package is installed, else "tcp" (docs/disaggregation.md: which transport wins where)."""
    from .nixl import nixl_available

    return "nixl" if nixl_available() else "tcp"


def make_transport(name: str, connect_timeout_s: float, io_timeout_s: float, auth: PeerAuth | None = None,
                   first_byte_s: float = FetchTimeouts.first_byte_s, limits: ServerLimits | None = None) -> KVTransport:
    """The transport named `name` (RemoteKVConfig validated it); the rest as TCPTransport's."""
    return KV_TRANSPORTS[name](connect_timeout_s, io_timeout_s, auth, first_byte_s, limits)


__all__ = ["CollectiveTransport", "KVServer", "KVTransport", "KV_TRANSPORTS", "NixlTransport", "ShmTransport",
           "TCPTransport", "default_transport", "make_transport"]
