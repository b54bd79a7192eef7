"""The TCP KV transport: a prefill rank serves its saved KV on one port, a decode rank fetches it by key.

One fetch is one connection: the decode side sends a header (the key, its cache layout, the tokens it wants
KV for), the server answers with the KV (engine/cluster/kv_wire.py) or a refusal that says why (nothing under
that key: never saved, already fetched, expired; another layout; other tokens). An entry is claimed (dropped
from the store, engine/cluster/kv_store.py) as its reply starts, so it is served once; a refused one stays until
its TTL, for a decode engine that fits.

The server binds exactly the host it is given (127.0.0.1 unless asked otherwise) and owns one accept thread and
one thread per open connection (at most MAX_CONNECTIONS); `close()` stops them all and closes every socket. Every blocking call on both
sides has a timeout, so a peer that stops answering ends a fetch with an error, never a hang.
"""
from __future__ import annotations

import logging
import socket
import threading

from moelink.engine.contract.safe_text import shown

from ..rank.kv_transfer import SavedKV, layout_difference
from .kv_store import SavedKVStore
from .kv_wire import (VERSION, Deadline, KVFetchError, Staging, layout_from_json, layout_to_json, recv_header,
                      recv_saved, send_header, send_saved, socket_take)

logger = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.2  # how soon the accept loop sees close()
MAX_CONNECTIONS = 64  # open at once; one past it is closed unanswered (its fetch fails, the request recomputes)


class KVSocketServer:
    """Serves `store` on a bound, listening socket until `close()` (module docstring); `reply(conn, saved, query)`
    sends an ok reply (the TCP transport: header and bytes on the stream; shared memory: header and a memfd).
    `io_timeout_s`: the most a connection may stay silent mid-message."""

    def __init__(self, store: SavedKVStore, sock: socket.socket, reply=None, io_timeout_s: float = 30.0) -> None:
        self.store, self.io_timeout_s, self._reply = store, io_timeout_s, reply or send_saved
        self._sock = sock
        self._sock.listen(64)
        self._sock.settimeout(_ACCEPT_POLL_S)
        self.address = self._sock.getsockname()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._accepter = threading.Thread(target=self._accept_loop, name="kv-server", daemon=True)
        self._accepter.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            conn.settimeout(self.io_timeout_s)
            t = threading.Thread(target=self._serve, args=(conn,), name="kv-tcp-conn", daemon=True)
            with self._lock:
                if self._stop.is_set():
                    conn.close()
                    return
                if len(self._conns) >= MAX_CONNECTIONS:  # a thread per connection: never without bound
                    logger.warning("KV server: %d connections open, one more refused", len(self._conns))
                    conn.close()
                    continue
                self._conns[t] = conn
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn:
                query = recv_header(conn)
                saved, refusal = self._lookup(query)
                if saved is not None and not self.store.take(query["key"], saved):
                    saved, refusal = None, f"the KV saved under {shown(query['key'])} went to another fetch"
                if saved is None:
                    send_header(conn, {"ok": False, "error": refusal})
                    return
                # Claimed before it is sent: if the send fails, the one decode request that wanted it recomputes.
                self._reply(conn, saved, query)
        except (OSError, RuntimeError, KVFetchError) as exc:  # the client went away (a collective transport's group
        # reports that as RuntimeError), or sent nonsense: its fetch fails there
            logger.info("KV server: a connection ended early: %s", exc)
        finally:
            with self._lock:
                self._conns.pop(threading.current_thread(), None)

    def _lookup(self, query: dict) -> tuple[SavedKV | None, str]:
        key = query.get("key")
        if query.get("v") != VERSION or not isinstance(key, str):
            return None, f"a fetch of protocol version {shown(query.get('v'))} (this server speaks {VERSION})"
        # A save still on its way from the device is waited for, as long as a silent peer would be.
        saved = self.store.peek(key, self.io_timeout_s)
        if saved is None:
            return None, f"nothing saved under {shown(key)} (never saved here, fetched already, or expired)"
        diff = layout_difference(saved.layout, layout_from_json(query.get("layout", [])))
        if diff is not None:
            return None, f"the KV saved under {shown(key)} has another layout than the decode engine's: {diff}"
        n, want = query.get("num_tokens"), query.get("token_ids")
        if not isinstance(n, int) or not isinstance(want, list) or n > saved.num_tokens \
                or list(saved.token_ids[:n]) != want[:n]:
            return None, (f"the KV saved under {shown(key)} is of other tokens ({saved.num_tokens} saved, the decode "
                          f"request wants {shown(n)} of its prompt)")
        return saved, ""

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._accepter.join(2 * _ACCEPT_POLL_S + 1.0)
        with self._lock:
            conns = dict(self._conns)
        for conn in conns.values():
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv or send
            except OSError:
                pass
        for t in conns:
            t.join(5.0)


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


def TCPKVServer(store: SavedKVStore, host: str, port: int, io_timeout_s: float = 30.0) -> KVSocketServer:
    """A server of `store` on exactly (host, port)."""
    return KVSocketServer(store, bound_socket(host, port), send_saved, io_timeout_s)


def tcp_fetch(host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
              connect_timeout_s: float, timeout_s: float, pin: bool = False, on_group=None) -> SavedKV:
    """The KV saved under `key` on (host, port), for this rank's cache `layout`, received into host memory
    (pinned when `pin`: it goes on to a GPU), each group handed to `on_group` as it arrives when one is given
    (kv_wire.recv_saved); KVFetchError (with the reason) on anything short of all of it
    within `timeout_s`."""
    deadline = Deadline(timeout_s, f"fetching KV {shown(key)} from {host}:{port}")
    try:
        with socket.create_connection((host, port), timeout=min(connect_timeout_s, deadline.left())) as sock:
            deadline.left(sock)
            send_header(sock, {"v": VERSION, "key": key, "layout": layout_to_json(layout),
                               "num_tokens": len(token_ids), "token_ids": list(token_ids)})
            reply = recv_header(sock, deadline)
            if reply.get("ok") is not True:
                raise KVFetchError(f"{host}:{port} refused: {reply.get('error', 'no reason given')}")
            staging = Staging(pin, reuse=on_group is not None)
            try:
                return recv_saved(socket_take(sock, deadline, staging), reply, layout, max_blocks, len(token_ids),
                                  on_group)
            finally:
                staging.release()
    except TimeoutError:
        raise KVFetchError(f"fetching KV {shown(key)} from {host}:{port}: timed out") from None
    except OSError as exc:
        raise KVFetchError(f"fetching KV {shown(key)} from {host}:{port}: {exc}") from None


__all__ = ["KVSocketServer", "TCPKVServer", "bound_socket", "tcp_fetch"]
