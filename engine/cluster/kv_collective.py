"""The collective KV transport: the exchange of the TCP transport (header, layout and token checks, claim once;
engine/cluster/kv_tcp.py) on its socket, the KV bytes over a torch.distributed point-to-point group of the two
ranks: NCCL between GPU ranks (device to device, over NVLink or the NIC as NCCL picks), gloo on CPU.

A pair group is made once per (decode rank, prefill rank) and reused by later fetches: the decode rank hosts its
rendezvous (a TCPStore on an ephemeral port of the address it fetches from, its own) and names it in the fetch
header; the prefill rank joins as rank 1 when it replies ok (a refusal makes no group). Both sides wait on every
group operation with the fetch's deadline, and a group that failed once is dropped on both sides (the next fetch
builds a new one), so a peer that dies mid-transfer costs that fetch (recomputed by the decode engine) and nothing
else. At most MAX_PAIRS groups are kept per process, the least recently used dropped first.

Where the bytes are: saved KV is in host memory on the prefill rank (the save copies the blocks out, on a side
stream, engine/rank/kv_transfer.py: its blocks are free for other requests at once), so with NCCL each tensor goes
host -> device on the prefill rank and NCCL to the decode rank's device, where it is received and then copied
into the request's blocks on the device: no host round trip on the decode side.
"""
from __future__ import annotations

import datetime
import logging
import socket
import threading
import uuid
from collections import OrderedDict

import torch
import torch.distributed as dist

from moelink.engine.contract.safe_text import shown

from ..rank.kv_transfer import SavedKV
from .kv_store import SavedKVStore
from .kv_tcp import KVSocketServer
from .kv_wire import (VERSION, Deadline, KVFetchError, Staging, layout_to_json, recv_header, recv_saved, saved_header,
                      send_header)

logger = logging.getLogger(__name__)

MAX_PAIRS = 64  # pair groups kept per process (each holds a few sockets, or an NCCL communicator)


def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _make_group(store, rank: int, device: torch.device, timeout_s: float):
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

    def drop(self, key) -> None:
        with self._lock:
            self._groups.pop(key, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._groups)


class _ClientPair:
    """A decode rank's group with one prefill rank: its rendezvous store, the group once built, a lock (one fetch
    at a time uses it: point-to-point messages of two fetches must not interleave)."""

    def __init__(self, bind_host: str, device: torch.device) -> None:
        self.name = uuid.uuid4().hex
        self.device = device
        self.store = dist.TCPStore(bind_host, 0, 2, True, timeout=datetime.timedelta(seconds=60),
                                   wait_for_workers=False)
        self.host, self.port = bind_host, self.store.port
        self.group = None
        self.lock = threading.Lock()


_client_pairs = _Pairs()
_server_pairs = _Pairs()


def _wait(work, deadline: Deadline, what: str) -> None:
    left = deadline.left()
    if not work.wait(datetime.timedelta(seconds=left)):
        raise KVFetchError(f"{what}: timed out")


def _send_over_group(device: torch.device, timeout_s: float):
    """The prefill side's reply: the header on the socket, then each tensor over the pair group."""

    def reply(conn: socket.socket, saved: SavedKV, query: dict) -> None:
        pg_info = query.get("pg")
        if not (isinstance(pg_info, dict) and isinstance(pg_info.get("host"), str)
                and isinstance(pg_info.get("port"), int) and isinstance(pg_info.get("pair"), str)):
            send_header(conn, {"ok": False, "error": "a collective fetch without its group's rendezvous (pg)"})
            return
        send_header(conn, saved_header(saved))
        key = (pg_info["host"], pg_info["port"], pg_info["pair"])
        deadline = Deadline(timeout_s, f"sending KV to {pg_info['host']} over its pair group")
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
                       device: torch.device | None = None) -> KVSocketServer:
    """A server of `store` on exactly (host, port); the KV bytes go over pair groups (module docstring)."""
    from .kv_tcp import bound_socket

    return KVSocketServer(store, bound_socket(host, port), _send_over_group(device or torch.device("cpu"),
                                                                           io_timeout_s), io_timeout_s)


def collective_fetch(host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
                     connect_timeout_s: float, timeout_s: float, device: torch.device | None = None,
                     on_group=None) -> SavedKV:
    """The KV saved under `key` at (host, port), its bytes over this rank's pair group with that server;
    KVFetchError with the reason within `timeout_s`."""
    device = device or torch.device("cpu")
    deadline = Deadline(timeout_s, f"fetching KV {shown(key)} from {host}:{port}")
    where = f"fetching KV {shown(key)} from {host}:{port}"
    peer = (host, port)
    try:
        with socket.create_connection((host, port), timeout=min(connect_timeout_s, deadline.left())) as sock:
            deadline.left(sock)
            pair = _client_pairs.get(peer)
            if pair is None:
                pair = _ClientPair(sock.getsockname()[0], device)
                _client_pairs.put(peer, pair)
            with pair.lock:
                send_header(sock, {"v": VERSION, "key": key, "layout": layout_to_json(layout),
                                   "num_tokens": len(token_ids), "token_ids": list(token_ids),
                                   "pg": {"host": pair.host, "port": pair.port, "pair": pair.name}})
                reply = recv_header(sock, deadline)
                if reply.get("ok") is not True:
                    raise KVFetchError(f"{host}:{port} refused: {reply.get('error', 'no reason given')}")
                try:
                    if pair.group is None:
                        pair.group = _make_group(dist.PrefixStore(pair.name, pair.store), 0, device, deadline.left())

                    staging = Staging(False, reuse=on_group is not None)

                    def take(shape: tuple) -> torch.Tensor:
                        # Received where the rows go next: on a GPU rank straight into device memory, which the
                        # connector's write copies into the blocks on the device (no host round trip); on CPU
                        # into host memory reused group after group (kv_wire.Staging).
                        buf = (torch.empty(shape, dtype=torch.uint8, device=device) if device.type != "cpu"
                               else staging(shape))
                        if buf.numel():
                            _wait(pair.group.recv([buf], 1, 0), deadline, where)
                        return buf

                    take.next_group = staging.next_group
                    try:
                        return recv_saved(take, reply, layout, max_blocks, len(token_ids), on_group)
                    finally:
                        staging.release()
                except Exception:
                    _client_pairs.drop(peer)  # a group that failed once is rebuilt by the next fetch
                    raise
    except KVFetchError:
        raise
    except TimeoutError:
        raise KVFetchError(f"{where}: timed out") from None
    except (OSError, RuntimeError) as exc:  # gloo/NCCL report a lost peer as RuntimeError
        raise KVFetchError(f"{where}: {exc}") from None


__all__ = ["CollectiveKVServer", "collective_fetch", "MAX_PAIRS"]
