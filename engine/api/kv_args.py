"""`--role prefill|decode` and the KV connector flags (prefill/decode disaggregation), validated before any
weights load; the server side of the handoff is engine/server/pd_role.py.

Roles (vLLM's kv_role names in GetServerInfo, what the managed gateway's PD mode and other routers read):

* `both` (default): one engine prefills and decodes; no connector unless `--kv-port` is given ("kv_both").
* `prefill` ("kv_producer"): serves saved prompt KV on `--kv-port` (+ rank). A request whose kv_transfer_params
  say `do_remote_decode` (a prefill server's default) has its prompt KV saved, and its final response carries the
  decode side's parameters.
* `decode` ("kv_consumer"): loads a request's prompt KV from the prefill engine its `do_remote_prefill` params
  name, instead of prefilling it (a failed or late transfer is recomputed here, never lost), if that engine is
  one of `--kv-peers` (default: loopback only); any other source is refused when the request arrives.

`--kv-offload-host-bytes` (with `--kv-offload-disk-bytes`, `--kv-offload-dir`) adds the prefix cache's host and
disk tiers (docs/kv-offload.md) to any role: alone (`both`), or beside the PD connector
(engine/kv_transfer/offload_compose.py).

Security (docs/security-kv.md): `--kv-secret-file` (or MOELINK_KV_SECRET), the same on every prefill and decode
server, authenticates both ends of every KV connection; it is required once a KV listener (`--kv-host`) or a peer
(`--kv-peers`) is not loopback.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from ..contract.safe_text import shown

if TYPE_CHECKING:
    from ..kv_transfer.offload import OffloadConfig, OffloadKVConnector
    from ..kv_transfer.offload_compose import WithOffload
    from ..kv_transfer.remote import RemoteKVConfig, RemoteKVConnector

# The KV data plane (engine/kv_transfer/) is imported where a role is built, not here: its transports and its
# auth load torch, which building the parser (and `moelink serve --help`) must not wait for. Its names the flags
# show, spelled out (tests/server/test_pd_flags.py checks them against kv_transfer's own):
KV_TRANSPORT_NAMES = ("collective", "nixl", "shm", "tcp")  # sorted(kv_transfer.transport.KV_TRANSPORTS)
SECRET_ENV = "MOELINK_KV_SECRET"  # kv_transfer.auth.SECRET_ENV

ROLES = ("both", "prefill", "decode")
KV_ROLE_NAMES = {"prefill": "kv_producer", "decode": "kv_consumer", "both": "kv_both"}


@dataclass(frozen=True)
class ServerRole:
    """`--role` and the KV connector settings."""

    role: str = "both"
    kv: Optional[RemoteKVConfig] = None  # None: no connector (role both without --kv-port)
    offload: Optional[OffloadConfig] = None  # the prefix cache's host/disk tiers (--kv-offload-*), any role

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role={shown(self.role)} is invalid: must be one of {', '.join(ROLES)}.")
        if self.role == "prefill" and (self.kv is None or self.kv.port is None):
            raise ValueError("kv_port=None is invalid with role=prefill: a prefill server serves the KV it saved "
                             "to decode servers on --kv-port (rank r on kv_port + r).")
        if self.role == "decode" and (self.kv is None or self.kv.port is not None):
            raise ValueError("role=decode needs a KV connector that serves nothing (kv port None).")

    @property
    def kv_role(self) -> str:
        """vLLM's name of this role ("" when the server moves no KV)."""
        return "" if self.kv is None else KV_ROLE_NAMES[self.role]

    def connector(self) -> RemoteKVConnector | OffloadKVConnector | WithOffload | None:
        from ..kv_transfer.offload import OffloadKVConnector
        from ..kv_transfer.offload_compose import WithOffload
        from ..kv_transfer.remote import RemoteKVConnector

        pd = None if self.kv is None else RemoteKVConnector(self.kv, KV_ROLE_NAMES[self.role])
        if self.offload is None:
            return pd
        tiers = OffloadKVConnector(self.offload)
        return tiers if pd is None else WithOffload(pd, tiers)


def add_role_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prefill/decode disaggregation (docs/disaggregation.md)")
    g.add_argument("--role", default="both", choices=ROLES,
                   help="prefill: compute prompts and serve their KV on --kv-port; decode: load prompt KV from the "
                        "prefill server a request names; both (default): one server does both")
    g.add_argument("--kv-transport", default=None, choices=KV_TRANSPORT_NAMES,
                   help="how KV moves between the two servers (both must use the same; shm: one host only); "
                        "default nixl where the nixl package is installed, else tcp")
    g.add_argument("--kv-host", default="127.0.0.1",
                   help="address a prefill server's KV listener binds (default loopback; rank r on --kv-port + r)")
    g.add_argument("--kv-port", type=int, default=None, help="first KV port of a prefill server")
    g.add_argument("--kv-advertise-host", default=None,
                   help="the address decode servers fetch from (default --kv-host; required when that is 0.0.0.0)")
    g.add_argument("--kv-ttl", type=float, default=120.0,
                   help="seconds saved KV waits for its decode server before it is dropped")
    g.add_argument("--kv-max-saved-bytes", type=int, default=4 << 30,
                   help="per rank: saved KV past this is dropped oldest first")
    g.add_argument("--kv-nixl-in-place", action=argparse.BooleanOptionalAction, default=True,
                   help="over NIXL, hold a finished prefill's blocks in the cache until the decode server reads them "
                        "(no copy on either side); --no-kv-nixl-in-place copies them to host memory instead")
    g.add_argument("--kv-nixl-hold", type=float, default=480.0, metavar="SECONDS",
                   help="over NIXL in place: seconds a finished prefill's blocks wait for their decode server before "
                        "they go back to the pool")
    g.add_argument("--kv-nixl-hold-fraction", type=float, default=0.25, metavar="FRACTION",
                   help="over NIXL in place: the share of a rank's KV cache that held saves may keep out of the pool; "
                        "past it the oldest hold is released first (its decode server recomputes)")
    g.add_argument("--kv-nixl-hold-client-fraction", type=float, default=0.0625, metavar="FRACTION",
                   help="over NIXL in place: the share one client's held saves may keep (at most "
                        "--kv-nixl-hold-fraction); past it that client's oldest hold is released first")
    g.add_argument("--kv-fetch-timeout", type=float, default=60.0,
                   help="seconds a decode server waits for one request's KV before it computes the prompt itself")
    g.add_argument("--kv-secret-file", default=None, metavar="PATH",
                   help=f"the deployment's KV secret (at least 16 bytes; a file no other user may read), the same on "
                        f"every prefill and decode server: both ends of a KV connection prove it (or set {SECRET_ENV}); "
                        f"required when --kv-host or a --kv-peers host is not loopback")
    g.add_argument("--kv-peers", default=None, metavar="HOST[:PORT[-PORT]],...",
                   help="the prefill servers a decode server may load KV from (their --kv-advertise-host or --kv-host "
                        "and KV ports); a request naming any other source is refused (default: loopback only)")
    g.add_argument("--kv-connect-timeout", type=float, default=5.0,
                   help="seconds a decode server waits to connect to a prefill server's KV port")
    g.add_argument("--kv-first-byte-timeout", type=float, default=5.0,
                   help="seconds for a KV handshake and for the first byte of a reply (both servers: use the same)")
    g.add_argument("--kv-max-loads", type=int, default=128,
                   help="per rank: KV loads in flight at once (past it a request's prompt is computed here)")
    g.add_argument("--kv-max-loads-per-source", type=int, default=64,
                   help="per rank: KV loads in flight from one prefill server's port")
    g.add_argument("--kv-offload-host-bytes", type=int, default=None,
                   help="per rank: keep the KV blocks the device prefix cache evicts in this many bytes of host "
                        "memory (pinned on CUDA, allocated at start; LRU) and load a prefix found there back instead "
                        "of recomputing it (any role: beside --role prefill|decode the request's PD load comes "
                        "first; at most 90%% of this machine's physical memory; docs/kv-offload.md)")
    g.add_argument("--kv-offload-disk-bytes", type=int, default=0,
                   help="per rank, below the host tier: blocks it pushes out go to a file under --kv-offload-dir, up "
                        "to this many bytes (LRU; 0: no disk tier; at most the free space under --kv-offload-dir)")
    g.add_argument("--kv-offload-dir", default=None,
                   help="the disk tier's directory (created 0700; its file is deleted at exit)")


def _offload_from_args(ns: argparse.Namespace) -> OffloadConfig | None:
    """The offload tiers the --kv-offload-* flags ask for (None: none); ValueError names the flag."""
    from ..kv_transfer.offload import OffloadConfig
    from ..kv_transfer.offload_tiers import disk_bytes_excess, host_bytes_excess

    host = getattr(ns, "kv_offload_host_bytes", None)
    disk, where = getattr(ns, "kv_offload_disk_bytes", 0), getattr(ns, "kv_offload_dir", None)
    if host is None:
        if disk or where is not None:
            raise ValueError("--kv-offload-disk-bytes and --kv-offload-dir are invalid without "
                             "--kv-offload-host-bytes: the disk tier is below the host tier.")
        return None
    if host < 1:
        raise ValueError(f"--kv-offload-host-bytes={host} is invalid: must be >= 1 (bytes of host memory per rank).")
    if disk < 0:
        raise ValueError(f"--kv-offload-disk-bytes={disk} is invalid: must be >= 0 (bytes per rank; 0: no disk tier).")
    if disk and where is None:
        raise ValueError(f"--kv-offload-disk-bytes={disk} needs --kv-offload-dir (the disk tier's directory).")
    if where is not None and not disk:
        raise ValueError("--kv-offload-dir is invalid without --kv-offload-disk-bytes (the disk tier's size).")
    if where is not None and os.path.exists(where) and not (os.path.isdir(where) and os.access(where, os.W_OK)):
        raise ValueError(f"--kv-offload-dir={shown(where)} is invalid: not a directory this user can write.")
    # Bounded by this machine before any weights load: a tier past it would start, then fail at its first eviction.
    why = host_bytes_excess(host)
    if why is not None:
        raise ValueError(f"--kv-offload-host-bytes={host} is invalid: {why}.")
    why = disk_bytes_excess(disk, where) if disk else None
    if why is not None:
        raise ValueError(f"--kv-offload-disk-bytes={disk} is invalid: {why}.")
    return OffloadConfig(host_bytes=host, disk_bytes=disk, disk_dir=where)


def role_from_args(ns: argparse.Namespace, num_ranks: int) -> ServerRole:
    """The role the flags ask for; ValueError names the flag."""
    from ..kv_transfer.auth import load_secret
    from ..kv_transfer.peers import parse_peers
    from ..kv_transfer.remote import RemoteKVConfig
    from ..kv_transfer.transport import default_transport

    offload = _offload_from_args(ns)
    if ns.role == "both" and ns.kv_port is None:
        return ServerRole("both", offload=offload)
    if ns.role == "decode" and ns.kv_port is not None:
        raise ValueError(f"--kv-port={ns.kv_port} is invalid with --role decode: a decode server serves no KV "
                         f"(give it to the prefill servers).")
    peers = None
    if ns.kv_peers is not None:
        try:
            peers = parse_peers(ns.kv_peers)
        except ValueError as exc:
            raise ValueError(f"--kv-peers={shown(ns.kv_peers)} is invalid: {exc}") from None
    extra = {} if getattr(ns, "max_model_len", None) is None else {"max_prompt_tokens": ns.max_model_len}
    kv = RemoteKVConfig(transport=ns.kv_transport or default_transport(), host=ns.kv_host, port=ns.kv_port,
                        num_ranks=num_ranks,
                        advertise_host=ns.kv_advertise_host, ttl_s=ns.kv_ttl, max_saved_bytes=ns.kv_max_saved_bytes,
                        fetch_timeout_s=ns.kv_fetch_timeout, secret=load_secret(ns.kv_secret_file), peers=peers,
                        connect_timeout_s=ns.kv_connect_timeout, first_byte_timeout_s=ns.kv_first_byte_timeout,
                        max_loads=ns.kv_max_loads, max_loads_per_source=ns.kv_max_loads_per_source,
                        nixl_in_place=ns.kv_nixl_in_place, nixl_hold_s=ns.kv_nixl_hold,
                        nixl_hold_fraction=ns.kv_nixl_hold_fraction,
                        nixl_hold_client_fraction=ns.kv_nixl_hold_client_fraction, **extra)
    return ServerRole(ns.role, kv, offload)


__all__ = ["ServerRole", "ROLES", "KV_ROLE_NAMES", "add_role_args", "role_from_args"]
