"""The remote KV connector's settings (engine/kv_transfer/remote.py), validated where made, and what a load names.

Security settings (docs/security-kv.md): `secret`, the deployment's KV secret (engine/kv_transfer/auth.py), required
as soon as anything of the KV plane leaves loopback: a listener on another host than loopback, or a decode
engine's peer that is not loopback; `peers`, the prefill engines a decode engine may fetch from
(engine/kv_transfer/peers.py; None: loopback only); the deadlines (`connect_timeout_s`, `first_byte_timeout_s`,
`fetch_timeout_s`) and the caps on loads (`max_loads`, `max_loads_per_source`, `max_loads_per_client`,
`max_load_block_fraction`; scheduler/kv_connector.py) and on a request's size (`max_prompt_tokens`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from moelink.engine.contract.safe_text import shown

from .auth import MIN_SECRET_BYTES
from .peers import describe_peers, is_host, is_loopback, parse_peers
from .transport import KV_TRANSPORTS, default_transport

WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
_PEERS_ALLOWED = "must be None (loopback only) or 'HOST[:PORT[-PORT]],...' (or a tuple of (host, first, last) port ranges)"


@dataclass(frozen=True)
class RemoteKVConfig:
    """The remote KV connector's settings (module docstring; engine/kv_transfer/remote.py)."""

    # A name in transport.KV_TRANSPORTS: "nixl" (the default where the nixl package is installed), "tcp" (the
    # default without it), "shm" (one host), "collective"; both engines the same.
    transport: str = field(default_factory=default_transport)
    host: str = "127.0.0.1"  # where this engine's ranks serve their saved KV (bound exactly: never wider)
    # The address decode engines are told to fetch from (outputs' remote_host); None: `host`. Needed when `host`
    # is a wildcard (0.0.0.0, ::), which binds every interface but names none a peer can dial.
    advertise_host: Optional[str] = None
    port: Optional[int] = None  # rank r serves on port + r; None: this engine serves nothing (decode only)
    # This engine's ranks, each serving on its own port, port + [0, num_ranks): the world (expert_parallel_size, or
    # the TP group's ranks under -tp alone; RemoteKVConnector.for_tensor_parallel raises it to the engine's world).
    num_ranks: int = 1
    ttl_s: float = 120.0  # saved KV not fetched within this is dropped (swept while idle too)
    max_saved_bytes: int = 4 << 30  # per rank; past it the oldest saved KV is dropped
    connect_timeout_s: float = 5.0
    fetch_timeout_s: float = 60.0  # a whole fetch, connection to last byte; also a server's whole-reply limit
    # A fetch's handshake answer and reply header each within this (a silent source costs this, not
    # fetch_timeout_s); a server's limit for a peer's handshake and whole request from accept.
    first_byte_timeout_s: float = 5.0
    # The deployment's KV secret (auth.py): the same bytes on every prefill and decode engine. Never shown.
    secret: Optional[bytes] = field(default=None, repr=False, compare=False)
    # The prefill engines a decode engine may fetch from (peers.py): None, loopback only.
    peers: Optional[tuple] = None
    max_prompt_tokens: int = 1 << 18  # a KV request's token ids a server reads at most (the engine's max_model_len)
    max_loads: int = 128  # loads in flight at once on a decode engine's rank (past it, a request is computed here)
    max_loads_per_source: int = 64  # of those, from one prefill engine (host and port)
    max_loads_per_client: int = 64  # of those, for one client (Request.client, when the server names it)
    max_load_block_fraction: float = 0.5  # of the KV blocks, what loads in flight may hold at most
    # NIXL only (engine/kv_transfer/nixl_inplace.py): a prefill rank registers its paged KV cache once and holds a
    # saved request's blocks until a decode rank has READ them in place (no host copy on either side), or until
    # `nixl_hold_s` passes (vLLM's NixlConnector aborts a held request after 480 s too); False: the copy path.
    nixl_in_place: bool = True
    nixl_hold_s: float = 480.0
    # The share of a rank's KV cache bytes that held saves may name at once, and of that, one client's share
    # (docs/security-kv.md: a client that never fetches cannot starve admission). Past either, the oldest hold (the
    # client's own, past its share) is released first; a save that alone is past them is copied instead.
    nixl_hold_fraction: float = 0.25
    nixl_hold_client_fraction: float = 0.0625

    def __post_init__(self) -> None:
        _check(self.transport in KV_TRANSPORTS, "transport", self.transport,
               f"must be one of {', '.join(sorted(KV_TRANSPORTS))}")
        _check(isinstance(self.host, str) and (self.host in WILDCARD_HOSTS - {""} or is_host(self.host)), "host",
               self.host, "must be a host name or IP address to bind, e.g. 127.0.0.1")
        _check(self.advertise_host is None or (is_host(self.advertise_host) and self.advertise_host
               not in WILDCARD_HOSTS), "advertise_host", self.advertise_host,
               "must be None or the host name or IP address decode engines reach this engine at (not a wildcard)")
        _check(self.port is None or self.host not in WILDCARD_HOSTS or self.advertise_host is not None, "advertise_host",
               self.advertise_host, f"must be set when host={self.host!r} (a wildcard): the address decode engines dial")
        _check(_is_int(self.num_ranks) and 1 <= self.num_ranks <= 1024, "num_ranks", self.num_ranks,
               "must be an integer in [1, 1024]")
        _check(self.port is None or (_is_int(self.port) and 1 <= self.port <= 65536 - self.num_ranks), "port",
               self.port, f"must be None (serve nothing) or an integer in [1, {65536 - self.num_ranks}] "
               f"(num_ranks={self.num_ranks} ports from it)")
        _check(isinstance(self.nixl_in_place, bool), "nixl_in_place", self.nixl_in_place, "must be True or False")
        for name in ("ttl_s", "connect_timeout_s", "fetch_timeout_s", "first_byte_timeout_s", "nixl_hold_s"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0, name, v,
                   "must be a finite number of seconds > 0")
        for name in ("max_saved_bytes", "max_prompt_tokens", "max_loads", "max_loads_per_source",
                     "max_loads_per_client"):
            _check(_is_int(getattr(self, name)) and getattr(self, name) >= 1, name, getattr(self, name),
                   "must be an integer >= 1")
        for name in ("max_load_block_fraction", "nixl_hold_fraction", "nixl_hold_client_fraction"):
            f = getattr(self, name)
            _check(isinstance(f, (int, float)) and not isinstance(f, bool) and 0 < f <= 1, name, f,
                   "must be a number in (0, 1]")
        _check(self.nixl_hold_client_fraction <= self.nixl_hold_fraction, "nixl_hold_client_fraction",
               self.nixl_hold_client_fraction, f"must be at most nixl_hold_fraction ({self.nixl_hold_fraction})")
        if isinstance(self.peers, str):
            try:
                object.__setattr__(self, "peers", parse_peers(self.peers))
            except ValueError as exc:
                raise ValueError(f"RemoteKVConfig.peers is invalid: {exc}") from None
        _check(self.peers is None or (isinstance(self.peers, tuple) and all(
            isinstance(p, tuple) and len(p) == 3 and is_host(p[0]) and _is_int(p[1]) and _is_int(p[2])
            and 1 <= p[1] <= p[2] <= 65535 for p in self.peers)), "peers", self.peers, _PEERS_ALLOWED)
        _check(self.secret is None or (isinstance(self.secret, bytes) and len(self.secret) >= MIN_SECRET_BYTES),
               "secret", "<hidden>" if self.secret is not None else None,
               f"must be None or bytes, at least {MIN_SECRET_BYTES} of them")
        if self.secret is None:
            if self.port is not None and not is_loopback(self.host):
                raise ValueError(f"RemoteKVConfig.secret=None is invalid with host={self.host!r}: a KV listener off "
                                 f"loopback needs the deployment's KV secret (--kv-secret-file or MOELINK_KV_SECRET).")
            wide = [p for p in self.peers or () if not is_loopback(p[0])]
            if wide:
                raise ValueError(f"RemoteKVConfig.secret=None is invalid with peers={describe_peers(wide)!r}: fetching "
                                 f"from a peer off loopback needs the deployment's KV secret (--kv-secret-file or "
                                 f"MOELINK_KV_SECRET).")

    @property
    def reachable_host(self) -> str:
        """The host a decode engine is told to fetch from."""
        return self.advertise_host or self.host


@dataclass(frozen=True)
class RemoteSource:
    """A load's source (`KVTransfer.params`): the prefill engine's ranks' addresses and the capability."""

    host: str
    port: int
    num_ranks: int
    key: str
    token_ids: tuple[int, ...]  # the decode request's prompt: the saved KV must be of exactly these tokens

    def __repr__(self) -> str:  # never the capability (logs, failures)
        return f"RemoteSource({self.host}:{self.port}+{self.num_ranks}, {len(self.token_ids)} tokens)"


class SaveKey(str):
    """A save's `KVTransfer.params`: the capability it is stored under (a str: every store and server op keys by
    it), carrying what the worker half needs to decide whether to hold it in place (engine/kv_transfer/
    remote_worker.py): `hold`, the request asked for the handoff itself (not a prefill server's role default), and
    `client`, whom a hold counts against (the widest name of `Request.client`; () anonymous)."""

    hold: bool
    client: tuple

    def __new__(cls, key: str, hold: bool = True, client: tuple = ()) -> "SaveKey":
        out = super().__new__(cls, key)
        out.hold, out.client = hold, tuple(client)
        return out

    def __reduce__(self):  # pickled to Ray ranks with its fields
        return (SaveKey, (str(self), self.hold, self.client))

    def __repr__(self) -> str:  # never the capability
        return f"SaveKey(hold={self.hold}, client={self.client!r})"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"RemoteKVConfig.{name}={shown(value)} is invalid: {allowed}.")


__all__ = ["RemoteKVConfig", "RemoteSource", "SaveKey", "WILDCARD_HOSTS"]
