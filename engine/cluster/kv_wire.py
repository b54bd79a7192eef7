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
import threading
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


def recv_saved(take, header: dict, layout: tuple, max_blocks: int, want_tokens: int = 0,
               on_group=None) -> SavedKV:
    """The tensors an ok `header` announces, each checked against `layout` (this rank's) and `max_blocks` (the
    blocks asked for) before `take(shape)` is asked for it: `take` returns a uint8 tensor of that shape holding
    the next bytes (`socket_take`: read from a socket into host memory; the shared-memory transport: a view of the
    mapping, no copy; the collective transport: received on the rank's device). A reply of fewer than
    `want_tokens` tokens is refused before any byte is read. With `on_group(g, idx, rows)`, each group is handed
    over as soon as its bytes are in (the decode rank writes it into its blocks while the next group arrives) and
    not kept: the SavedKV returned then holds no rows."""
    try:
        num_tokens, token_ids = int(header["num_tokens"]), tuple(int(x) for x in header["token_ids"])
        their_layout = layout_from_json(header["layout"])
        announced = [([int(i) for i in idx], [tuple(int(x) for x in s) for s in shapes])
                     for idx, shapes in header["groups"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise KVFetchError(f"a malformed reply header: {exc!r}") from None
    if their_layout != layout or len(announced) != len(layout):
        raise KVFetchError("the reply's KV layout is not this rank's")
    if num_tokens < want_tokens:
        raise KVFetchError(f"a reply of {num_tokens} tokens' KV for {want_tokens} asked")
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
            rows.append(take(want))
        if on_group is not None:
            on_group(len(groups), idx, tuple(rows))
            rows = []
            if hasattr(take, "next_group"):
                take.next_group()  # written: the staging memory is free for the next group
        groups.append((idx, tuple(rows)))
    return SavedKV(num_tokens, token_ids, their_layout, groups)


class Staging:
    """Host memory that one fetch receives each group into, reused group after group: with the rows written into
    the cache blocks as each group arrives (`recv_saved`'s `on_group`), a decode rank needs one layer's bytes at a
    time, not the prompt's, and memory it has touched before (fresh pages fault on first touch: a fresh buffer per
    fetch cost more than the copy on our CPU machines). Pinned when the rows go on to a GPU (`pin`): the write's
    host-to-device copy then needs no staging of its own. Without `on_group` every row gets fresh memory (the
    caller keeps them). Buffers come from, and go back to, a small per-process pool (`_POOL`)."""

    def __init__(self, pin: bool, reuse: bool) -> None:
        self.pin, self.reuse = pin, reuse
        self._buf: torch.Tensor | None = None
        self._used = 0

    def __call__(self, shape: tuple) -> torch.Tensor:
        n = math.prod(shape)
        if not self.reuse:
            return torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin)
        if self._buf is None or self._used + n > self._buf.numel():
            # Rows of one group must not move while the group is taken: a new buffer keeps the old one's rows
            # alive through their views; it goes back to the pool when this fetch ends.
            self.release()
            self._buf = _POOL.get(max(n, 1 << 20), self.pin)
        view = self._buf[self._used:self._used + n].view(shape)
        self._used += n
        return view

    def next_group(self) -> None:
        """The previous group's rows are written: their bytes may be reused."""
        self._used = 0

    def release(self) -> None:
        if self._buf is not None:
            _POOL.put(self._buf, self.pin)
            self._buf = None
        self._used = 0


class _StagingPool:
    """Free host buffers by pinnedness, at most `keep` of each kind kept (the largest); a cache, not state:
    a buffer in use is never here."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._lock = threading.Lock()
        self._free: dict[bool, list[torch.Tensor]] = {False: [], True: []}

    def get(self, nbytes: int, pin: bool) -> torch.Tensor:
        with self._lock:
            free = self._free[pin]
            fits = [i for i, b in enumerate(free) if b.numel() >= nbytes]
            if fits:
                return free.pop(min(fits, key=lambda i: free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)

    def put(self, buf: torch.Tensor, pin: bool) -> None:
        with self._lock:
            free = self._free[pin]
            free.append(buf)
            free.sort(key=lambda b: -b.numel())
            del free[self.keep:]


_POOL = _StagingPool()


def socket_take(sock: socket.socket, deadline: Deadline, staging: Staging):
    """`recv_saved`'s `take` for a stream socket: each tensor read into `staging`."""

    def take(shape: tuple) -> torch.Tensor:
        buf = staging(shape)
        if buf.numel():
            recv_exact_into(sock, memoryview(buf.numpy()).cast("B"), deadline)
        return buf

    take.next_group = staging.next_group
    return take


def _itemsize(dtype: str) -> int:
    dt = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise KVFetchError(f"an unknown KV cache dtype {dtype!r}")
    return dt.itemsize


__all__ = ["Deadline", "KVFetchError", "layout_from_json", "layout_to_json", "recv_header", "recv_saved",
           "saved_header", "send_header", "send_saved", "socket_take", "Staging"]
