"""A prefill rank's KV server: serves its saved-KV store (engine/kv_transfer/store.py) to decode engines, one fetch
per connection, on a listening socket a transport gives it (TCP, engine/kv_transfer/tcp.py; a Unix socket,
shm.py; the collective transport's TCP side, collective.py).

A connection, in order, each step within ServerLimits.handshake_timeout_s of accept (a whole-message deadline,
not a per-read one: a peer trickling bytes is cut off at it):
  1. the handshake (engine/kv_transfer/auth.py): versions, and with a deployment secret both sides' proofs;
  2. the request: a header (at most 64 KiB: the key, the decode rank's layout, `num_tokens`), then the prompt's
     token ids as raw int32, at most `max_prompt_tokens` of them, received as they arrive;
  3. the answer: an ok reply with the KV (within `io_timeout_s`), or a refusal.
Refusals never tell whether a key exists: a wrong key, an entry already fetched or expired, and a prompt that is
not exactly the saved one (other tokens, another count) all get NO_KV. An entry is claimed (dropped from the store)
only by a fetch that matches it exactly, as its reply starts, so it is served once and a failed fetch consumes
nothing. A decode rank of another cache layout is refused by name, whatever key it asked for (the rank's own layout
is compared, not the entry's). The ok reply carries no token ids. Under tensor parallelism the key ends in a
shard ask (engine/kv_transfer/tp_shard.py): the heads a decode rank wants of this rank's; the layout compared is
this rank's cut to that many heads, heads it does not hold are refused by name, and the reply carries exactly
those heads (the entry claimed once per decode rank).

Bounds. At most `max_connections` connections at once and `max_per_peer` from one peer address (Unix sockets: one
peer process), each with a thread; when either is full, the oldest connection that has not finished its request
is closed to make room (idle or slow connections cannot hold the slots a real fetch needs; one that is being
served is never closed for that), and a connection that finds no such room is closed unanswered. Saved KV past its
TTL is swept every `sweep_s` by the accept thread, so an idle engine frees it too. `close()` stops every thread
and closes every socket.
"""
from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
import time
from dataclasses import dataclass

from ..contract.kv_blocks import SavedKV, layout_difference
from .auth import NO_SECRET, KVRefused, PeerAuth
from .store import SavedKVStore
from .tp_shard import Heads, ShardAsk, check_ask, local_heads, needed_ranks, parse_key, slice_heads, with_heads
from .wire import (MAX_HELLO_BYTES, VERSION, Deadline, KVFetchError, layout_from_json, recv_header, recv_tokens,
                      send_header, send_saved, tokens_to_bytes)

logger = logging.getLogger(__name__)

_ACCEPT_POLL_S = 0.2  # how soon the accept loop sees close()
NO_KV = "no KV for this key and these tokens"
MAX_KEY_CHARS = 256
_DRAIN_S, _DRAIN_BYTES = 0.2, 4 << 20  # after a refusal: at most this long, this much


@dataclass(frozen=True)
class ServerLimits:
    """What one KV server allows (module docstring)."""

    handshake_timeout_s: float = 5.0  # handshake and the whole request, from accept
    io_timeout_s: float = 30.0  # a whole reply; the shared-memory transport's wait for its client to hang up
    max_prompt_tokens: int = 1 << 18  # token ids one request may send
    max_connections: int = 128
    max_per_peer: int = 64  # below max_connections: one address cannot take every slot
    sweep_s: float = 1.0  # how often saved KV past its TTL is dropped while nothing else touches the store

    @property
    def save_wait_s(self) -> float:
        """How long a request waits for a save that has begun (its bytes still on their way from the device):
        half the client's first-byte deadline (the same setting on both sides), so the refusal still reaches it."""
        return self.handshake_timeout_s / 2


class _Conn:
    __slots__ = ("sock", "peer", "since", "serving", "thread")

    def __init__(self, sock: socket.socket, peer) -> None:
        self.sock, self.peer, self.since, self.serving = sock, peer, time.monotonic(), False
        self.thread: threading.Thread | None = None


def _peer_of(sock: socket.socket, addr):
    if sock.family == socket.AF_UNIX:  # the peer process (credentials: pid, uid, gid)
        try:
            return "pid", struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        except OSError:
            return "unix", None
    return addr[0] if isinstance(addr, tuple) else addr


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv or send
    except OSError:
        pass


class KVSocketServer:
    """Serves `store` on a bound, not yet listening socket until `close()` (module docstring). `reply(conn, saved,
    query, deadline)` sends an ok reply (TCP: header and bytes on the stream; shared memory: header and a memfd;
    collective: header here, bytes over a pair group)."""

    def __init__(self, store: SavedKVStore, sock: socket.socket, reply=None, limits: ServerLimits | None = None,
                 auth: PeerAuth | None = None) -> None:
        self.store, self.limits, self.auth = store, limits or ServerLimits(), auth or NO_SECRET
        self._reply = reply or send_saved
        self._sock = sock
        self._sock.listen(64)
        self._sock.settimeout(_ACCEPT_POLL_S)
        self.address = self._sock.getsockname()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []  # open and counted against the caps
        self._threads: set[threading.Thread] = set()  # every connection thread still running (evicted ones too)
        self.num_evicted = self.num_refused = 0
        self._accepter = threading.Thread(target=self._accept_loop, name="kv-server", daemon=True)
        self._accepter.start()

    # ------------------------------------------------------------------ connections
    def _accept_loop(self) -> None:
        swept = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - swept >= self.limits.sweep_s:
                self.store.expire()  # TTLs pass while the engine is idle too
                swept = time.monotonic()
            try:
                sock, addr = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            c = _Conn(sock, _peer_of(sock, addr))
            c.thread = threading.Thread(target=self._serve, args=(c,), name="kv-conn", daemon=True)
            with self._lock:
                if self._stop.is_set():
                    sock.close()
                    return
                room = self._make_room(c.peer)
                if room:
                    self._conns.append(c)
                    self._threads.add(c.thread)
            if not room:
                self.num_refused += 1
                logger.warning("KV server: %d connections open, all being served; one more closed", len(self._conns))
                sock.close()
                continue
            c.thread.start()

    def _make_room(self, peer) -> bool:
        """Under the lock: whether a connection from `peer` may open, closing the oldest one not yet served from
        the peer at its cap (or from the busiest peer, when all slots are full) if that is what it takes."""
        lim = self.limits
        mine = [c for c in self._conns if c.peer == peer]
        if len(mine) < lim.max_per_peer and len(self._conns) < lim.max_connections:
            return True
        if len(mine) >= lim.max_per_peer:
            pool = mine
        else:
            counts: dict = {}
            for c in self._conns:
                counts[c.peer] = counts.get(c.peer, 0) + 1
            busiest = max(counts, key=counts.get)
            pool = [c for c in self._conns if c.peer == busiest and not c.serving] or self._conns
        waiting = [c for c in pool if not c.serving]
        if not waiting:
            return False
        victim = min(waiting, key=lambda c: c.since)
        self._conns.remove(victim)
        self.num_evicted += 1
        _shut(victim.sock)
        return True

    def _serve(self, c: _Conn) -> None:
        conn = c.sock
        try:
            with conn:
                deadline = Deadline(self.limits.handshake_timeout_s, "a KV handshake and request")
                try:
                    try:
                        self.auth.server(conn, deadline)
                    except KVFetchError as exc:  # not our handshake (another version, a stranger), or too slow
                        raise KVRefused(f"not a KV handshake of protocol version {VERSION} in time: {exc}") from None
                    query, key, layout, token_bytes = self._request(conn, deadline)
                    key, ask = _parse_key(key)
                    saved = self._lookup(key, layout, token_bytes, ask)
                    with self._lock:  # served from here on: never closed to make room (and not claimed if it was)
                        c.serving = saved is not None and c in self._conns
                    claim = () if ask is None else (ask.rank, self._needed(ask))
                    if saved is None or not c.serving or not self.store.take(key, saved, *claim):  # claimed before sent
                        raise KVRefused(NO_KV)
                    if ask is not None:
                        saved = self._shard(saved, ask)
                except KVRefused as exc:
                    _refuse(conn, str(exc))
                    return
                # Claimed: if the send fails, the one decode request that wanted it recomputes.
                self._reply(conn, saved, query, Deadline(self.limits.io_timeout_s, "a KV reply"))
        except (OSError, RuntimeError, KVFetchError) as exc:  # the client went away (a collective transport's group
            # reports that as RuntimeError), was cut off, or sent nonsense: its fetch fails there
            logger.info("KV server: a connection ended early: %s", exc)
        finally:
            with self._lock:
                if c in self._conns:
                    self._conns.remove(c)
                self._threads.discard(c.thread)

    def _request(self, conn: socket.socket, deadline: Deadline) -> tuple[dict, str, tuple, bytes]:
        """The request's header and token ids, checked field by field; KVRefused says which field is wrong."""
        try:
            query = recv_header(conn, deadline)
        except KVFetchError as exc:
            raise KVRefused(f"a malformed KV request: {exc}") from None
        key, n = query.get("key"), query.get("num_tokens")
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
            raise KVRefused(f"a KV request whose key is not a string of 1 to {MAX_KEY_CHARS} characters")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 < n <= self.limits.max_prompt_tokens:
            raise KVRefused(f"a KV request whose num_tokens is not an integer in [1, {self.limits.max_prompt_tokens}]")
        try:
            layout = layout_from_json(query.get("layout"))
        except KVFetchError:
            raise KVRefused("a KV request whose layout is not one") from None
        return query, key, layout, recv_tokens(conn, n, deadline)

    def _held(self) -> Heads | None:
        """The kv heads this rank's saves hold (the worker's, under TP; else every head of its layout)."""
        if self.store.heads is not None or self.store.layout is None:
            return self.store.heads
        return local_heads(None, 0, self.store.layout)

    def _lookup(self, key: str, layout: tuple, token_bytes: bytes, ask: ShardAsk | None = None) -> SavedKV | None:
        """The entry a request names, if it matches exactly (module docstring); KVRefused for another layout, or
        (a shard ask, engine/kv_transfer/tp_shard.py) heads this rank does not hold. A shard ask's layout is the
        decode rank's with the heads asked: compared with this rank's cut to as many."""
        mine = self.store.layout
        if mine is not None and ask is not None:
            reason = check_ask(self._held(), ask, self.store.reader)
            if reason is not None:
                raise KVRefused(reason)
            mine = mine if ask.heads is None else with_heads(mine, ask.heads.count)
        diff = None if mine is None else layout_difference(mine, layout)
        if diff is not None:  # the rank's layout, not the entry's: says nothing about the key
            raise KVRefused(f"this prefill rank's KV layout is not the decode engine's: {diff}")
        saved = self.store.peek(key, self.limits.save_wait_s)
        want = token_bytes if saved is None else tokens_to_bytes(saved.token_ids)
        same = hmac.compare_digest(want, token_bytes)  # constant time, and done whether or not the key exists
        if saved is None or not same:
            return None
        if ask is not None and check_ask(self._held(), ask, self.store.reader) is not None:
            return None  # (the first save came while this request waited: its layout was not known above)
        if ask is not None and type(saved) is not SavedKV:  # a HeldKV (nixl_inplace.py): block ids, not rows
            self.store.end_hold(key, saved)  # no decode rank of this engine can read it: its blocks go back now
            raise KVRefused("this prefill rank holds the KV in place (NIXL), which is not cut into TP shards: run it "
                            "with --no-kv-nixl-in-place (RemoteKVConfig.nixl_in_place=False) for a TP decode engine")
        ours = saved.layout if ask is None or ask.heads is None else with_heads(saved.layout, ask.heads.count)
        return saved if ours == layout else None

    def _needed(self, ask: ShardAsk) -> frozenset:
        """The decode ranks that take from this rank's entries: its one reader with states, else by heads."""
        return frozenset({self.store.reader[0]}) if self.store.reader is not None else needed_ranks(self._held(), ask)

    def _shard(self, saved: SavedKV, ask: ShardAsk) -> SavedKV:
        """The heads `ask` names of a claimed entry (the whole entry for a whole latent, or all of this rank's)."""
        held = self._held()
        if ask.heads is None or ask.heads == held:
            return saved
        return slice_heads(saved, ask.heads.start - held.start, ask.heads.count)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._accepter.join(2 * _ACCEPT_POLL_S + 1.0)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for c in conns:
            _shut(c.sock)
        for t in threads:
            t.join(5.0)


def _parse_key(key: str) -> tuple[str, ShardAsk | None]:
    try:
        return parse_key(key)
    except ValueError as exc:
        raise KVRefused(str(exc)) from None


def _refuse(sock: socket.socket, message: str) -> None:
    """A refusal, best effort and brief (the peer may be gone, or the one not reading). What the peer sent and we
    did not read is drained for a moment after it (bounded): closing on unread bytes resets the connection, and a
    reset can drop the refusal before the peer reads it."""
    try:
        sock.settimeout(1.0)
        send_header(sock, {"ok": False, "error": message[:MAX_HELLO_BYTES // 2]})
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(_DRAIN_S)
        drained = 0
        while drained < _DRAIN_BYTES and (chunk := sock.recv(1 << 16)):
            drained += len(chunk)
    except OSError:
        pass


__all__ = ["KVSocketServer", "MAX_KEY_CHARS", "NO_KV", "ServerLimits"]
