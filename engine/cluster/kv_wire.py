"""What crosses the wire when a decode engine fetches saved KV from a prefill engine: framing and the KV itself.

A message is a JSON header (4-byte magic, 4-byte big-endian length, UTF-8 JSON) and, after a reply that says
ok, the raw bytes of every saved tensor in order. JSON and raw bytes, never pickle: a pickle from the network
runs code, and the bytes of a tensor need no encoding. The fetching side checks every shape the reply declares
against its own cache layout before it reads a byte of it, so a wrong or hostile reply cannot make it allocate
more than the blocks it asked for.

Legend: N blocks, X the bytes of one block row of a cache tensor (engine/rank/kv_transfer.py).
"""
from __future__ import annotations

import json
import math
import socket
import struct
import time

import torch

from ..rank.kv_transfer import SavedKV

MAGIC = b"MLKV"
VERSION = 1
MAX_HEADER_BYTES = 64 << 20  # a header holds token ids and block indices, never KV: 64 MiB is far past a prompt's


class KVFetchError(Exception):
    """A fetch failed: unreachable, refused, timed out, cut off, or a reply that does not fit (the message says
    which). The decode side reports the load failed and the request is recomputed."""


def layout_to_json(layout: tuple) -> list:
    return [[kind, [[dtype, list(shape)] for dtype, shape in tensors]] for kind, tensors in layout]


def layout_from_json(obj) -> tuple:
    try:
        return tuple((str(kind), tuple((str(dt), tuple(int(x) for x in shape)) for dt, shape in tensors))
                     for kind, tensors in obj)
    except (TypeError, ValueError) as exc:
        raise KVFetchError(f"a KV layout that is not one: {exc}") from None


class Deadline:
    """Seconds left until a fixed time; every blocking socket call is given what is left (never hangs)."""

    def __init__(self, seconds: float, what: str) -> None:
        self.end, self.what = time.monotonic() + seconds, what

    def left(self, sock: socket.socket | None = None) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise KVFetchError(f"{self.what}: timed out")
        if sock is not None:
            sock.settimeout(left)
        return left


def send_header(sock: socket.socket, header: dict) -> None:
    body = json.dumps(header, separators=(",", ":")).encode()
    sock.sendall(MAGIC + struct.pack(">I", len(body)) + body)


def recv_exact_into(sock: socket.socket, view: memoryview, deadline: Deadline | None) -> None:
    got = 0
    while got < len(view):
        if deadline is not None:
            deadline.left(sock)
        n = sock.recv_into(view[got:])
        if n == 0:
            raise KVFetchError("the connection closed mid-message (the other engine went away)")
        got += n


def recv_header(sock: socket.socket, deadline: Deadline | None = None) -> dict:
    head = bytearray(8)
    recv_exact_into(sock, memoryview(head), deadline)
    if bytes(head[:4]) != MAGIC:
        raise KVFetchError("not a moelink KV message (bad magic)")
    (size,) = struct.unpack(">I", head[4:])
    if size > MAX_HEADER_BYTES:
        raise KVFetchError(f"a header of {size} bytes (at most {MAX_HEADER_BYTES})")
    body = bytearray(size)
    recv_exact_into(sock, memoryview(body), deadline)
    try:
        header = json.loads(body)
    except ValueError as exc:
        raise KVFetchError(f"a header that is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise KVFetchError("a header that is not a JSON object")
    return header


def saved_header(saved: SavedKV) -> dict:
    """The ok reply's header: what `saved` holds, the shape of every tensor whose bytes follow."""
    groups = [[idx, [list(t.shape) for t in rows]] for idx, rows in saved.groups]
    return {"ok": True, "num_tokens": saved.num_tokens, "token_ids": list(saved.token_ids),
            "layout": layout_to_json(saved.layout), "groups": groups}


def send_saved(sock: socket.socket, saved: SavedKV, query: dict | None = None) -> None:
    """The ok reply over a stream socket: the header, then each group's tensors' bytes."""
    send_header(sock, saved_header(saved))
    for _, rows in saved.groups:
        for t in rows:
            sock.sendall(memoryview(t.contiguous().numpy()).cast("B"))


def recv_saved(fill, header: dict, layout: tuple, max_blocks: int) -> SavedKV:
    """The tensors an ok `header` announces, read into host memory by `fill(view)` (which fills a memoryview
    with the next bytes: from the socket, or from shared memory); each shape checked against `layout` (this
    rank's) and `max_blocks` (the blocks asked for) first."""
    try:
        num_tokens, token_ids = int(header["num_tokens"]), tuple(int(x) for x in header["token_ids"])
        their_layout = layout_from_json(header["layout"])
        announced = [([int(i) for i in idx], [tuple(int(x) for x in s) for s in shapes])
                     for idx, shapes in header["groups"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise KVFetchError(f"a malformed reply header: {exc!r}") from None
    if their_layout != layout or len(announced) != len(layout):
        raise KVFetchError("the reply's KV layout is not this rank's")
    groups = []
    for (idx, shapes), (_, tensors) in zip(announced, layout):
        if len(idx) > max_blocks or len(shapes) != len(tensors):
            raise KVFetchError(f"a reply of {len(idx)} blocks (asked for at most {max_blocks})")
        rows = []
        for shape, (dtype, row_shape) in zip(shapes, tensors):
            # uint8 rows: [N, *row shape with the last dim in bytes] (PagedKVBlocks.read's view)
            want = (len(idx),) + row_shape[:-1] + (row_shape[-1] * _itemsize(dtype),)
            if tuple(shape) != want:
                raise KVFetchError(f"a reply tensor of shape {shape} for rows of {row_shape}")
            buf_NX = torch.empty(shape, dtype=torch.uint8)
            if math.prod(shape):
                fill(memoryview(buf_NX.numpy()).cast("B"))
            rows.append(buf_NX)
        groups.append((idx, tuple(rows)))
    return SavedKV(num_tokens, token_ids, their_layout, groups)


def _itemsize(dtype: str) -> int:
    dt = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise KVFetchError(f"an unknown KV cache dtype {dtype!r}")
    return dt.itemsize


__all__ = ["Deadline", "KVFetchError", "layout_from_json", "layout_to_json", "recv_header", "recv_saved",
           "saved_header", "send_header", "send_saved"]
