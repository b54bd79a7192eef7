"""The shared-memory KV transport, for a prefill and a decode engine on one host: the KV bytes cross in shared
memory, not through a socket's buffers.

A fetch is the TCP transport's exchange (engine/cluster/kv_tcp.py: the same server, checks and refusals) over a
Unix-domain socket, except that an ok reply carries the KV in an anonymous shared-memory file (memfd) whose
descriptor travels with the header (SCM_RIGHTS): the server copies the saved rows into it once (pwrite), the
client reads them out once (pread, into memory it reuses group after group, kv_wire.Staging) and writes each
group into its cache blocks as it is read. The memfd has no name anywhere, so nothing is left behind when either side
dies: the kernel frees it when the last descriptor closes.

The socket is a file, `unix_socket_path(host, port)` in the temp dir, made by the server with mode 0600 (only the
same user can connect: narrower than a loopback port) and removed by `close()`. `host` and `port` only name it
(the decode side computes the same path from the prefill engine's kv_transfer_params); both engines must share
the host and its temp dir.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile

import torch

from moelink.engine.contract.safe_text import shown

from ..rank.kv_transfer import SavedKV
from .kv_store import SavedKVStore
from .kv_tcp import KVSocketServer
from .kv_wire import (VERSION, Deadline, KVFetchError, Staging, layout_to_json, recv_header, recv_saved, saved_header,
                      send_header)


def unix_socket_path(host: str, port: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"moelink-kv-{host}-{port}.sock")


def _send_in_memfd(conn: socket.socket, saved: SavedKV, query: dict | None = None) -> None:
    rows = [t.contiguous() for _, ts in saved.groups for t in ts]
    size = sum(t.numel() for t in rows)
    fd = os.memfd_create("moelink-kv", os.MFD_CLOEXEC)
    try:
        # Written with pwrite, not through a mapping: the kernel allocates the pages as it copies, where a fresh
        # mapping faults once per page (measured on our machines: ~0.6 GB/s through a mapping).
        off = 0
        for t in rows:
            view = memoryview(t.numpy()).cast("B")
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
        header = saved_header(saved) | {"bytes": size}
        send_header(conn, {"fd": True})  # the next message carries the descriptor
        socket.send_fds(conn, [b"F"], [fd])
        send_header(conn, header)
    finally:
        os.close(fd)  # the client holds its own descriptor now


def ShmKVServer(store: SavedKVStore, host: str, port: int, io_timeout_s: float = 30.0) -> KVSocketServer:
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
    server = KVSocketServer(store, sock, _send_in_memfd, io_timeout_s)
    close = server.close

    def close_and_unlink() -> None:
        close()
        if os.path.exists(path):
            os.unlink(path)

    server.close = close_and_unlink
    return server


def shm_fetch(host: str, port: int, key: str, layout: tuple, token_ids: list[int], max_blocks: int,
              timeout_s: float, on_group=None) -> SavedKV:
    """As tcp_fetch, over the Unix socket of (host, port), the KV read from the shared memory the reply names."""
    path = unix_socket_path(host, port)
    deadline = Deadline(timeout_s, f"fetching KV {shown(key)} from {path}")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            deadline.left(sock)
            sock.connect(path)
            send_header(sock, {"v": VERSION, "key": key, "layout": layout_to_json(layout),
                               "num_tokens": len(token_ids), "token_ids": list(token_ids)})
            reply = recv_header(sock, deadline)
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
                    # pread into memory this fetch reuses group after group (kv_wire.Staging), not a fresh
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

                take.next_group = staging.next_group
                return recv_saved(take, reply, layout, max_blocks, len(token_ids), on_group)
            finally:
                staging.release()
                os.close(fd)
    except TimeoutError:
        raise KVFetchError(f"fetching KV {shown(key)} from {path}: timed out") from None
    except OSError as exc:
        raise KVFetchError(f"fetching KV {shown(key)} from {path}: {exc}") from None


__all__ = ["ShmKVServer", "shm_fetch", "unix_socket_path"]
