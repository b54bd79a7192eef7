"""The collective KV transport: the exchange of the TCP transport (handshake, request, exact-match claim, refusals;
engine/kv_transfer/server.py) on its socket, the KV bytes over a torch.distributed point-to-point group of the two
ranks: NCCL between GPU ranks (device to device, over NVLink or the NIC as NCCL picks), gloo on CPU.

A pair group is made once per (decode rank, prefill rank) and reused by later fetches: the decode rank hosts its
rendezvous (a TCPStore) and names it in the fetch request; the prefill rank joins as rank 1 when it replies ok.
The rendezvous listens on exactly the decode rank's own address on the fetch's connection (the socket is bound
here and handed to the TCPStore, never a wildcard), is opened only after the handshake succeeded (with a
deployment secret: only for a peer that proved it), keys its entries under a fresh random 128-bit prefix sent over
that connection (another local client of the store cannot guess them), and is closed again unless a group was
built on it: a refused or failed fetch leaves no listener behind. The prefill rank joins only a rendezvous on the
address its client connected from. Both sides wait on every group operation with the fetch's deadline, and a
group that failed once is dropped on both sides (the next fetch builds a new one), so a peer that dies
mid-transfer costs that fetch (recomputed by the decode engine) and nothing else. At most MAX_PAIRS groups are
kept per process, the least recently used dropped (and its listener closed) first.

Where the bytes are: saved KV is in host memory on the prefill rank (the save copies the blocks out, on a side
stream, engine/contract/kv_blocks.py: its blocks are free for other requests at once), so with NCCL each tensor goes
host -> device on the prefill rank and NCCL to the decode rank's device, where it is received and then copied
into the request's blocks on the device: no host round trip on the decode side.
"""
from __future__ import annotations

import datetime
import logging
import re
import secrets
import socket
import threading
from collections import OrderedDict

import torch
import torch.distributed as dist

from ..contract.kv_blocks import SavedKV
from .auth import PeerAuth
from .client import FetchTimeouts, request_kv
from .server import KVSocketServer, ServerLimits
from .store import SavedKVStore
from .wire import Deadline, KVFetchError, Staging, recv_saved, saved_header, send_header

logger = logging.getLogger(__name__)

MAX_PAIRS = 16  # pair groups kept per process (each holds a few sockets, or an NCCL communicator, and a listener)
_PAIR_NAME = re.compile(r"[0-9a-f]{32}\Z")


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _make_group(store, rank: int, device: torch.device, timeout_s: float):
    """A pair group. Its own sockets are the backend's: gloo listens on the address the host name resolves to
    (GLOO_SOCKET_IFNAME narrows it), NCCL on the interfaces it picks (NCCL_SOCKET_IFNAME); never a wildcard."""
    timeout = datetime.timedelta(seconds=max(timeout_s, 1.0))
    if _backend(device) == "nccl":
        return dist.ProcessGroupNCCL(store, rank, 2, dist.ProcessGroupNCCL.Options())
    return dist.ProcessGroupGloo(store, rank, 2, timeout)


class _Pairs:
    """A bounded, thread-safe LRU of pair groups (either side)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._groups: OrderedDict = OrderedDict()

    def get(self, key):
        with self._lock:
            entry = self._groups.get(key)
            if entry is not None:
                self._groups.move_to_end(key)
            return entry

    def put(self, key, entry) -> None:
        with self._lock:
            self._groups[key] = entry
            self._groups.move_to_end(key)
            while len(self._groups) > MAX_PAIRS:
                self._groups.popitem(last=False)

    def drop(self, key, entry=None) -> None:
        """Forget `key` (only if it still holds `entry`, when given): its group and listener go with the last
        reference."""
        with self._lock:
            if entry is None or self._groups.get(key) is entry:
                self._groups.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._groups)


class _ClientPair:
    """A decode rank's group with one prefill rank: its rendezvous store (opened by `open`, after a handshake), the
    group once built, a lock (one fetch at a time uses it: point-to-point messages of two fetches must not
    interleave)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.name = self.host = self.port = self.store = self.group = None
        self.lock = threading.Lock()

    def open(self, bind_host: str) -> dict:
        """The rendezvous named in the request, opened on `bind_host` unless it is open already."""
        if self.store is None:
            # Bound here, to exactly this address, and handed over (the TCPStore owns and closes it): a TCPStore
            # that binds its own port listens on every interface.
            listener = socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.bind((bind_host, 0))
                listener.listen(8)
                port = listener.getsockname()[1]
            except OSError:
                listener.close()
                raise
            self.store = dist.TCPStore(bind_host, port, 2, True, timeout=datetime.timedelta(seconds=60),
                                       wait_for_workers=False, master_listen_fd=listener.detach(), use_libuv=True)
            self.name, self.host, self.port = secrets.token_hex(16), bind_host, port
        return {"pg": {"host": self.host, "port": self.port, "pair": self.name}}

    def close(self) -> None:
        """Drop the group and the rendezvous (its listener closes with the last reference)."""
        self.group = self.store = None


_client_pairs = _Pairs()
_server_pairs = _Pairs()


def _wait(work, deadline: Deadline, what: str) -> None:
    left = deadline.left()
    if not work.wait(datetime.timedelta(seconds=left)):
        raise KVFetchError(f"{what}: timed out")


def _send_over_group(device: torch.device):
    """The prefill side's reply: the header on the socket, then each tensor over the pair group."""

    def reply(conn: socket.socket, saved: SavedKV, query: dict, deadline: Deadline) -> None:
        pg_info = query.get("pg")
        peer = conn.getpeername()[0]
        if not (isinstance(pg_info, dict) and pg_info.get("host") == peer and isinstance(pg_info.get("port"), int)
                and not isinstance(pg_info["port"], bool) and 1 <= pg_info["port"] <= 65535
                and isinstance(pg_info.get("pair"), str) and _PAIR_NAME.match(pg_info["pair"])):
            # (the entry is claimed already: this fetch fails, its request is recomputed)
            send_header(conn, {"ok": False, "error": "a collective fetch without a rendezvous (pg) on its own address"},
                        deadline)
            return
        send_header(conn, saved_header(saved), deadline)
        key = (pg_info["host"], pg_info["port"], pg_info["pair"])
        group = _server_pairs.get(key)
        try:
            if group is None:
                store = dist.TCPStore(pg_info["host"], pg_info["port"], 2, False,
                                      timeout=datetime.timedelta(seconds=max(deadline.left(), 1.0)))
                group = _make_group(dist.PrefixStore(pg_info["pair"], store), 1, device, deadline.left())
                _server_pairs.put(key, group)
            for _, rows in saved.groups:
                for t in rows:
                    if t.numel():
                        _wait(group.send([t.to(device).contiguous()], 0, 0), deadline, "sending KV")
        except Exception:
            _server_pairs.drop(key)  # a broken group is never reused
            raise

    return reply


def CollectiveKVServer(store: SavedKVStore, host: str, port: int, io_timeout_s: float = 30.0,
                       device: torch.device | None = None, limits: ServerLimits | None = None,
                       auth: PeerAuth | None = None) -> KVSocketServer:
    """A server of `store` on exactly (host, port); the KV bytes go over pair groups (module docstring)."""
    from .tcp import bound_socket

    return KVSocketServer(store, bound_socket(host, port), _send_over_group(device or torch.device("cpu")),
                          limits or ServerLimits(io_timeout_s=io_timeout_s), auth)


def collective_fetch(host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
                     connect_timeout_s: float, timeout_s: float, device: torch.device | None = None,
                     on_group=None, auth: PeerAuth | None = None,
                     first_byte_s: float = FetchTimeouts.first_byte_s) -> SavedKV:
    """The KV saved under `key` at (host, port) for exactly `token_ids`, its bytes over this rank's pair group with
    that server; KVFetchError with the reason within `timeout_s`."""
    device = device or torch.device("cpu")
    where = f"fetching KV from {host}:{port}"
    deadline = Deadline(timeout_s, where)
    peer = (host, port)
    pair = _client_pairs.get(peer)
    if pair is None:
        pair = _ClientPair(device)
        _client_pairs.put(peer, pair)
    if not pair.lock.acquire(timeout=max(deadline.left(), 0.0)):
        raise KVFetchError(f"{where}: timed out behind another fetch from the same prefill rank")
    refused = False
    try:
        with socket.create_connection((host, port), timeout=min(connect_timeout_s, deadline.left())) as sock:
            # The rendezvous opens after the handshake: a listener only for a peer that passed it.
            reply = request_kv(sock, where, key, layout, token_ids, deadline, first_byte_s, auth,
                               lambda: pair.open(sock.getsockname()[0]), max_blocks)
            if reply.get("ok") is not True:
                refused = True
                raise KVFetchError(f"{host}:{port} refused: {reply.get('error', 'no reason given')}")
            if pair.group is None:
                pair.group = _make_group(dist.PrefixStore(pair.name, pair.store), 0, device, deadline.left())
            staging = Staging(False, reuse=on_group is not None)

            def take(shape: tuple) -> torch.Tensor:
                # Received where the rows go next: on a GPU rank straight into device memory, which the connector's
                # write copies into the blocks on the device (no host round trip); on CPU into host memory reused
                # group after group (wire.Staging).
                buf = torch.empty(shape, dtype=torch.uint8, device=device) if device.type != "cpu" else staging(shape)
                if buf.numel():
                    _wait(pair.group.recv([buf], 1, 0), deadline, where)
                return buf

            take.next_group = staging.next_group  # type: ignore[attr-defined]  # recv_saved calls it when set
            try:
                return recv_saved(take, reply, layout, max_blocks, token_ids, on_group)
            finally:
                staging.release()
    except Exception as exc:
        # Failed before a group was built (unreachable, refused), or failed at all: no listener stays without a
        # group, and a group that failed once is rebuilt by the next fetch (a refusal leaves a built one as it was).
        if pair.group is None or not refused:
            pair.close()
            _client_pairs.drop(peer, pair)
        if isinstance(exc, KVFetchError):
            raise
        if isinstance(exc, TimeoutError):
            raise KVFetchError(f"{where}: timed out") from None
        if isinstance(exc, (OSError, RuntimeError)):  # gloo/NCCL report a lost peer as RuntimeError
            if "Duplicate GPU" in str(exc):  # NCCL's own words for two ranks of a group on one device
                raise KVFetchError(f"{where}: the prefill and this rank are on the same GPU, which NCCL cannot pair; "
                                   f"the collective transport needs them on different GPUs (kv_transfer transport "
                                   f"'shm' or 'nixl' serves one GPU)") from None
            raise KVFetchError(f"{where}: {exc}") from None
        raise
    finally:
        pair.lock.release()

__all__ = ["CollectiveKVServer", "collective_fetch", "MAX_PAIRS"]
