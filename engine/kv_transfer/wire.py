"""What crosses the wire when a decode engine fetches saved KV from a prefill engine: framing and the KV itself.

A message is a JSON header (4-byte magic, 4-byte big-endian length, UTF-8 JSON) and, after it, raw bytes the
header declares: a request's prompt token ids (little-endian int32, `num_tokens` of them), an ok reply's saved
tensors in order. JSON and raw bytes, never pickle: a pickle from the network runs code, and neither token ids
nor a tensor need an encoding. Every size is bounded before anything is allocated for it: a header at most
MAX_HEADER_BYTES (MAX_HELLO_BYTES before a peer has authenticated, engine/kv_transfer/auth.py), token ids at most
the server's `max_prompt_tokens` and received as they arrive, and every shape an ok reply declares is checked
against the fetching rank's own cache layout before it reads a byte of it, so a wrong or hostile reply cannot
make it allocate more than the blocks it asked for. Every receive runs against a whole-message `Deadline` (not a
per-read timeout: a peer trickling a byte at a time cannot hold a connection past it).

An ok reply's header carries no token ids: the decode engine proved it has the prompt (the server compares it
with the saved one), so nothing of it is echoed back. A layout is typed per group (version 3): "full" and
"sliding" groups are blocks of a table, a "state" group a hybrid model's per-sequence state (one row, the state at
the transfer's `num_tokens`); both sides' layouts must be equal, so a state travels only between hybrid engines.

Legend: N blocks, X the bytes of one block row of a cache tensor (engine/contract/kv_blocks.py).
"""
from __future__ import annotations

import json
import math
import socket
import struct
import threading
import time

import numpy as np
import torch

from ..contract.kv_blocks import SavedKV

MAGIC = b"MLKV"
# 2: authenticated handshake, capabilities, token ids as raw int32 after the header, no ids echoed; 3: typed groups
# (a layout's group kind "state": a linear-attention layer's per-sequence state beside the KV blocks,
# engine/contract/kv_blocks.py), so a version-2 peer, which would take a state group for blocks, is refused.
VERSION = 3
MAX_HEADER_BYTES = 64 << 10  # a header holds a key, a layout and block shapes, never token ids or KV
MAX_HELLO_BYTES = 1 << 10  # a message before the peer has authenticated (hello, proof, a refusal)
TOKEN_DTYPE = np.dtype("<i4")


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


def send_header(sock: socket.socket, header: dict, deadline: "Deadline | None" = None) -> None:
    body = json.dumps(header, separators=(",", ":")).encode()
    if deadline is not None:
        deadline.left(sock)  # sendall's timeout bounds the whole send (not each chunk of it)
    sock.sendall(MAGIC + struct.pack(">I", len(body)) + body)


def recv_exact_into(sock: socket.socket, view: memoryview, deadline: Deadline | None) -> None:
    got = 0
    while got < len(view):
        if deadline is not None:
            deadline.left(sock)
        try:
            n = sock.recv_into(view[got:])
        except TimeoutError:
            raise KVFetchError(f"{deadline.what if deadline else 'a KV message'}: timed out") from None
        if n == 0:
            raise KVFetchError("the connection closed mid-message (the other engine went away)")
        got += n


def recv_header(sock: socket.socket, deadline: Deadline | None = None, max_bytes: int = MAX_HEADER_BYTES) -> dict:
    """One header, refused by its declared length before any of its body is read or allocated."""
    head = bytearray(8)
    recv_exact_into(sock, memoryview(head), deadline)
    if bytes(head[:4]) != MAGIC:
        raise KVFetchError("not a moelink KV message (bad magic)")
    (size,) = struct.unpack(">I", head[4:])
    if size > max_bytes:
        raise KVFetchError(f"a KV message header of {size} bytes (at most {max_bytes} allowed at this point of "
                           f"protocol version {VERSION})")
    body = bytearray(size)
    recv_exact_into(sock, memoryview(body), deadline)
    try:
        header = json.loads(body)
    except ValueError as exc:
        raise KVFetchError(f"a header that is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise KVFetchError("a header that is not a JSON object")
    return header


def tokens_to_bytes(token_ids) -> bytes:
    """Token ids as the wire carries them (little-endian int32)."""
    arr = np.asarray(token_ids, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << 31):
        raise KVFetchError("a token id outside [0, 2**31)")
    return arr.astype(TOKEN_DTYPE).tobytes()


def recv_tokens(sock: socket.socket, num_tokens: int, deadline: Deadline) -> bytes:
    """`num_tokens` token ids' bytes (the caller bounded the count), received in chunks as they arrive: memory
    grows with what the peer really sent, not with what it declared."""
    want, buf = num_tokens * TOKEN_DTYPE.itemsize, bytearray()
    while len(buf) < want:
        deadline.left(sock)
        try:
            chunk = sock.recv(min(want - len(buf), 1 << 16))
        except TimeoutError:
            raise KVFetchError(f"{deadline.what}: timed out") from None
        if not chunk:
            raise KVFetchError("the connection closed mid-message (the other engine went away)")
        buf += chunk
    return bytes(buf)


def saved_header(saved: SavedKV) -> dict:
    """The ok reply's header: what `saved` holds, the shape of every tensor whose bytes follow; no token ids."""
    groups = [[idx, [list(t.shape) for t in rows]] for idx, rows in saved.groups]
    return {"ok": True, "num_tokens": saved.num_tokens, "layout": layout_to_json(saved.layout), "groups": groups}


def send_saved(sock: socket.socket, saved: SavedKV, query: dict | None = None, deadline: Deadline | None = None) -> None:
    """The ok reply over a stream socket: the header, then each group's tensors' bytes, all within `deadline`."""
    send_header(sock, saved_header(saved), deadline)
    for _, rows in saved.groups:
        for t in rows:
            if deadline is not None:
                deadline.left(sock)
            sock.sendall(memoryview(t.contiguous().numpy()).cast("B"))


def recv_saved(take, header: dict, layout: tuple, max_blocks: int, token_ids, on_group=None) -> SavedKV:
    """The tensors an ok `header` announces, each checked against `layout` (this rank's) and `max_blocks` (the
    blocks asked for) before `take(shape)` is asked for it: `take` returns a uint8 tensor of that shape holding
    the next bytes (`socket_take`: read from a socket into host memory; the shared-memory transport: a view of the
    mapping, no copy; the collective transport: received on the rank's device). A reply for another number of
    tokens than `token_ids` (the prompt asked for) is refused before any byte is read. With `on_group(g, idx,
    rows)`, each group is handed over as soon as its bytes are in (the decode rank writes it into its blocks while
    the next group arrives) and not kept: the SavedKV returned then holds no rows."""
    token_ids = tuple(token_ids)
    try:
        num_tokens = int(header["num_tokens"])
        their_layout = layout_from_json(header["layout"])
        announced = [([int(i) for i in idx], [tuple(int(x) for x in s) for s in shapes])
                     for idx, shapes in header["groups"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise KVFetchError(f"a malformed reply header: {exc!r}") from None
    if their_layout != layout or len(announced) != len(layout):
        raise KVFetchError("the reply's KV layout is not this rank's")
    if num_tokens != len(token_ids):
        raise KVFetchError(f"a reply of {num_tokens} tokens' KV for {len(token_ids)} asked")
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

    take.next_group = staging.next_group  # type: ignore[attr-defined]  # recv_saved calls it when set
    return take


def _itemsize(dtype: str) -> int:
    dt = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype):
        raise KVFetchError(f"an unknown KV cache dtype {dtype!r}")
    return dt.itemsize


__all__ = ["Deadline", "KVFetchError", "MAX_HEADER_BYTES", "MAX_HELLO_BYTES", "VERSION", "layout_from_json",
           "layout_to_json", "recv_header", "recv_saved", "recv_tokens", "saved_header", "send_header", "send_saved",
           "socket_take", "Staging", "tokens_to_bytes"]
