"""A decode rank's side of one KV fetch, shared by the transports (tcp.py, shm.py, collective.py): the
handshake, the request, the first reply header; what follows the header is each transport's own.

Deadlines (all of them, so a silent, slow or hostile peer costs seconds, not the whole fetch timeout): the connect
(`FetchTimeouts.connect_s`, the caller's); the handshake and the first reply header each within `first_byte_s`
(the server answers within it: it waits at most half of it for a save still on its way); the whole fetch,
connection to last byte, within `total_s`. The prompt's token ids and the capability are sent only once the
handshake has succeeded, i.e. with a deployment secret, only to a peer that proved it holds it
(engine/kv_transfer/auth.py).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass

from .auth import NO_SECRET, PeerAuth
from .wire import MAX_HEADER_BYTES, VERSION, Deadline, layout_to_json, recv_header, send_header, tokens_to_bytes


@dataclass(frozen=True)
class FetchTimeouts:
    connect_s: float = 5.0
    first_byte_s: float = 5.0  # the handshake's answer, and the reply header after the request
    total_s: float = 60.0  # the whole fetch


def first(deadline: Deadline, seconds: float, what: str) -> Deadline:
    """A deadline `seconds` from now, never past `deadline`."""
    return Deadline(min(seconds, max(deadline.left(), 0.0)), what)


REPLY_BYTES_PER_BLOCK = 48  # what an ok reply's header may spend per block and group: an index, in place an id too


def request_kv(sock: socket.socket, where: str, key: str, layout: tuple, token_ids, deadline: Deadline,
               first_byte_s: float, auth: PeerAuth | None = None, extra=None, max_blocks: int = 0) -> dict:
    """Handshake, request, and the first reply header (the caller reads the rest, or the refusal in it). `extra()`,
    when given, is called after the handshake and its dict joins the request header (the collective transport
    opens its rendezvous only for an authenticated peer). The reply header is bounded by what was asked: the
    fixed header bound plus `REPLY_BYTES_PER_BLOCK` per group and block of the `max_blocks` asked for (the header
    lists each group's block entries: a long prompt's passes a fixed 64 KiB)."""
    (auth or NO_SECRET).client(sock, first(deadline, first_byte_s, f"{where}: the handshake"), where)
    ids = tokens_to_bytes(token_ids)
    header = {"v": VERSION, "key": key, "layout": layout_to_json(layout), "num_tokens": len(token_ids)}
    if extra is not None:
        header.update(extra())
    send_header(sock, header, deadline)
    deadline.left(sock)
    sock.sendall(ids)
    return recv_header(sock, first(deadline, first_byte_s, f"{where}: the reply"),
                       MAX_HEADER_BYTES + len(layout) * max_blocks * REPLY_BYTES_PER_BLOCK)


__all__ = ["FetchTimeouts", "REPLY_BYTES_PER_BLOCK", "first", "request_kv"]
