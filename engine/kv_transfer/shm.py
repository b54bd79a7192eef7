"""The shared-memory KV transport, for a prefill and a decode engine on one host: the KV bytes cross in shared
memory, not through a socket's buffers.

A fetch is the TCP transport's exchange (engine/kv_transfer/tcp.py: the same server, checks and refusals) over a
Unix-domain socket, except that an ok reply carries the KV in an anonymous shared-memory file (memfd) whose
descriptor travels with the header (SCM_RIGHTS): the server copies the saved rows into it once (pwrite), the
client reads them out once (pread, into memory it reuses group after group, wire.Staging) and writes each
group into its cache blocks as it is read. The server reuses its files (`_MemfdPool`: one goes back once its
client has hung up), so their pages are allocated once, not per fetch. A memfd has no name anywhere, so nothing
is left behind when either side dies: the kernel frees it when the last descriptor closes.

The socket is a file, `unix_socket_path(host, port)` in the temp dir, made by the server with mode 0600 (only the
same user can connect: narrower than a loopback port) and removed by `close()`. `host` and `port` only name it
(the decode side computes the same path from the prefill engine's kv_transfer_params), and only a validated host
name or IP address and a port number can (engine/kv_transfer/peers.py: no '/', no '..'); both engines must share
the host and its temp dir. The handshake, request and refusals are the TCP transport's (server.py), per-peer
bounds counting the peer process.

A reused reply file is cut to the reply's length before it is written (ftruncate: the kernel drops, and zeroes,
what was past it), so a reply never carries bytes of an earlier one.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import threading

import torch

from ..contract.kv_blocks import SavedKV
from .auth import PeerAuth
from .client import FetchTimeouts, request_kv
from .peers import is_host
from .server import KVSocketServer, ServerLimits
from .store import SavedKVStore
from .wire import Deadline, KVFetchError, Staging, recv_header, recv_saved, saved_header, send_header


def unix_socket_path(host: str, port: int) -> str:
    """The socket file of (host, port): ValueError unless `host` is a host name or IP address and `port` a port."""
    if not is_host(host) or not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"remote_host={host!r}, remote_port={port!r} is invalid for the shm KV transport: allowed "
                         f"are a host name or IP address and a port in [1, 65535].")
    return os.path.join(tempfile.gettempdir(), f"moelink-kv-{host}-{port}.sock")


class _MemfdPool:
    """The shared-memory files one server replies in, reused reply after reply: a fresh file's pages are allocated
    as the server writes them, which cost more than the copy itself on our machines (a fetch of DeepSeek-V3's KV
    ran at 1.5 GB/s with a new file per reply). A file goes back to the pool only once the client that was handed
    it has hung up, i.e. read all it wanted; at most `keep` are kept. A reused file is cut to the reply's size
    first (`get`): a reply never carries bytes of an earlier one past its end."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = []  # (fd, size)
        self._closed = False

    def get(self, size: int) -> tuple[int, int]:
        with self._lock:
            fits = [i for i, (_, cap) in enumerate(self._free) if cap >= size]
            fd, cap = self._free.pop(min(fits, key=lambda i: self._free[i][1])) if fits else (None, 0)
        if fd is not None:
            if cap != size:
                os.ftruncate(fd, size)  # the bytes past `size` are gone: never an earlier reply's
            return fd, size
        fd = os.memfd_create("moelink-kv", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        return fd, size

    def put(self, fd: int, cap: int) -> None:
        with self._lock:
            if not self._closed:
                self._free.append((fd, cap))
                self._free.sort(key=lambda e: -e[1])
                fd, cap = self._free.pop() if len(self._free) > self.keep else (None, 0)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._closed, free, self._free = True, self._free, []
        for fd, _ in free:
            os.close(fd)


def _memfd_reply(pool: _MemfdPool):
    """The shared-memory server's ok reply: the rows written into a pooled file, its descriptor sent, and the file
    back to the pool once the client hangs up (a client that stays silent past the reply's deadline, or says
    anything, keeps it: the file is closed instead)."""

    def reply(conn: socket.socket, saved: SavedKV, query: dict, deadline: Deadline) -> None:
        rows = [t.contiguous() for _, ts in saved.groups for t in ts]
        size = sum(t.numel() for t in rows)
        fd, cap = pool.get(size)
        done = False
        try:
            # pwrite, not a mapping: a fresh mapping faults once per page (~0.6 GB/s measured).
            off = 0
            for t in rows:
                view = memoryview(t.numpy()).cast("B")
                while view:
                    n = os.pwrite(fd, view, off)
                    view, off = view[n:], off + n
            header = saved_header(saved) | {"bytes": size}
            send_header(conn, {"fd": True}, deadline)  # the next message carries the descriptor
            deadline.left(conn)
            socket.send_fds(conn, [b"F"], [fd])
            send_header(conn, header, deadline)
            deadline.left(conn)
            done = conn.recv(1) == b""  # the client hung up: it has read every byte it will read
        except (OSError, KVFetchError):
            done = False
        finally:
            if done:
                pool.put(fd, cap)
            else:
                os.close(fd)  # (the client holds its own descriptor)

    return reply


def ShmKVServer(store: SavedKVStore, host: str, port: int, io_timeout_s: float = 30.0,
                limits: ServerLimits | None = None, auth: PeerAuth | None = None) -> KVSocketServer:
    """A server of `store` on the Unix socket `unix_socket_path(host, port)` (module docstring)."""
    path = unix_socket_path(host, port)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file: rw for this user only
    try:
        if os.path.exists(path):
            os.unlink(path)  # a server of this path that died without closing
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise OSError(f"the KV server cannot listen on {path}: {exc}") from None
    finally:
        os.umask(old)
    pool = _MemfdPool()
    server = KVSocketServer(store, sock, _memfd_reply(pool), limits or ServerLimits(io_timeout_s=io_timeout_s), auth)
    close = server.close

    def close_and_unlink() -> None:
        close()
        pool.close()
        if os.path.exists(path):
            os.unlink(path)

    server.close = close_and_unlink
    return server


def shm_fetch(host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
              timeout_s: float, on_group=None, auth: PeerAuth | None = None,
              first_byte_s: float = FetchTimeouts.first_byte_s) -> SavedKV:
    """As tcp_fetch, over the Unix socket of (host, port), the KV read from the shared memory the reply names."""
    try:
        path = unix_socket_path(host, port)
    except ValueError as exc:
        raise KVFetchError(str(exc)) from None
    where = f"fetching KV from {path}"
    deadline = Deadline(timeout_s, where)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            deadline.left(sock)
            sock.connect(path)
            reply = request_kv(sock, where, key, layout, token_ids, deadline, first_byte_s, auth,
                               max_blocks=max_blocks)
            if reply.get("fd") is not True:
                raise KVFetchError(f"{path} refused: {reply.get('error', 'no reason given')}")
            deadline.left(sock)
            _, fds, _, _ = socket.recv_fds(sock, 1, 1)
            if len(fds) != 1:
                raise KVFetchError(f"{path} sent no shared-memory descriptor")
            fd = fds[0]
            staging = Staging(False, reuse=on_group is not None)
            try:
                reply = recv_header(sock, deadline)
                size = int(reply.get("bytes", -1))
                if size < 0 or size > os.fstat(fd).st_size:
                    raise KVFetchError(f"a reply of {size} bytes in {os.fstat(fd).st_size} of shared memory")
                pos = [0]

                def take(shape: tuple) -> torch.Tensor:
                    # pread into memory this fetch reuses group after group (wire.Staging), not a fresh
                    # mapping: no page faults past the first group.
                    n = math.prod(shape)
                    if pos[0] + n > size:
                        raise KVFetchError("the reply's tensors run past its shared memory")
                    buf = staging(shape)
                    view = memoryview(buf.numpy()).cast("B") if n else memoryview(b"")
                    while view:
                        got = os.preadv(fd, [view], pos[0])
                        if got <= 0:
                            raise KVFetchError("the shared memory ended early")
                        view, pos[0] = view[got:], pos[0] + got
                    return buf

                take.next_group = staging.next_group  # type: ignore[attr-defined]  # recv_saved calls it when set
                return recv_saved(take, reply, layout, max_blocks, token_ids, on_group)
            finally:
                staging.release()
                os.close(fd)
    except TimeoutError:
        raise KVFetchError(f"{where}: timed out") from None
    except OSError as exc:
        raise KVFetchError(f"{where}: {exc}") from None


__all__ = ["ShmKVServer", "shm_fetch", "unix_socket_path"]
