"""The TCP KV transport: a prefill rank serves its saved KV on one port, a decode rank fetches it by key.

One fetch is one connection: the handshake (engine/kv_transfer/auth.py), then the decode side's request (the
capability, its cache layout, the prompt's token ids) and the server's answer: the KV (engine/kv_transfer/wire.py)
or a refusal that never says whether the key exists (engine/kv_transfer/server.py, which also bounds connections,
sizes and deadlines). The server binds exactly the host it is given (127.0.0.1 unless asked otherwise); `close()`
stops its threads and closes every socket. Every blocking call on both sides runs against a deadline, so a peer
that stops answering ends a fetch with an error, never a hang (client.py).
"""
from __future__ import annotations

import socket

from .auth import PeerAuth
from .client import FetchTimeouts, request_kv
from .server import KVSocketServer, ServerLimits
from .store import SavedKVStore
from .wire import Deadline, KVFetchError, Staging, recv_saved, send_saved, socket_take
from ..contract.kv_blocks import SavedKV


def bound_socket(host: str, port: int) -> socket.socket:
    """A stream socket bound to exactly (host, port) (not listening yet)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"the KV server cannot listen on {host}:{port}: {exc}") from None
    return sock


def TCPKVServer(store: SavedKVStore, host: str, port: int, io_timeout_s: float = 30.0,
                limits: ServerLimits | None = None, auth: PeerAuth | None = None) -> KVSocketServer:
    """A server of `store` on exactly (host, port); `limits` default to ServerLimits with `io_timeout_s`."""
    limits = limits or ServerLimits(io_timeout_s=io_timeout_s)
    return KVSocketServer(store, bound_socket(host, port), send_saved, limits, auth)


def tcp_fetch(host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
              connect_timeout_s: float, timeout_s: float, pin: bool = False, on_group=None,
              auth: PeerAuth | None = None, first_byte_s: float = FetchTimeouts.first_byte_s) -> SavedKV:
    """The KV saved under `key` on (host, port) for exactly `token_ids`, for this rank's cache `layout`, received
    into host memory (pinned when `pin`: it goes on to a GPU), each group handed to `on_group` as it arrives when
    one is given (wire.recv_saved); KVFetchError (with the reason) on anything short of all of it within
    `timeout_s` (the handshake and the reply's header each within `first_byte_s`)."""
    where = f"fetching KV from {host}:{port}"
    deadline = Deadline(timeout_s, where)
    try:
        with socket.create_connection((host, port), timeout=min(connect_timeout_s, deadline.left())) as sock:
            reply = request_kv(sock, where, key, layout, token_ids, deadline, first_byte_s, auth,
                               max_blocks=max_blocks)
            if reply.get("ok") is not True:
                raise KVFetchError(f"{host}:{port} refused: {reply.get('error', 'no reason given')}")
            staging = Staging(pin, reuse=on_group is not None)
            try:
                return recv_saved(socket_take(sock, deadline, staging), reply, layout, max_blocks, token_ids, on_group)
            finally:
                staging.release()
    except TimeoutError:
        raise KVFetchError(f"{where}: timed out") from None
    except OSError as exc:
        raise KVFetchError(f"{where}: {exc}") from None


__all__ = ["KVSocketServer", "ServerLimits", "TCPKVServer", "bound_socket", "tcp_fetch"]
