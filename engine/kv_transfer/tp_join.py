"""A TP group's KV transfer reports, joined: a transfer is done for the scheduler only once every rank of the group
has it done (a load written into each rank's heads, a save's bytes out of each rank's blocks).

Why: under tensor parallelism the group's ranks run one scheduler's steps and the group's first rank's output is
the group's (engine/cluster/ray_executor.tp_group_outputs), but each rank fetches or saves its own heads' KV on
threads of its own: were the first rank's poll alone reported, its load done while another rank's still arrives,
the next step would compute the request with that rank's heads half written. So the other ranks send the
transfer ids their polls report to the first rank, and its poll reports a transfer only once all ranks have
(failed if any failed); the others' own reports go nowhere (the executor drops them).

The channel is a Unix socket in the abstract namespace (no file; a TP group is on one node:
engine/config/tensor_parallel.check_tp_layout), named by `KVShardSpec.join_id` (fresh per engine) and the group:
the first rank listens from its construction, the others connect at their first report and send lines
"<transfer id> <rank> <1|0>". A rank that cannot connect yet keeps its reports and tries again at its next poll (the
scheduler keeps stepping while transfers are awaited).
"""
from __future__ import annotations

import errno
import logging
import socket
import threading
import time

logger = logging.getLogger(__name__)


class TPJoin:
    """Joins the reports of TP rank `tp_rank` of `tp_size` in the group named `name` (module docstring)."""

    def __init__(self, name: str, tp_rank: int, tp_size: int) -> None:
        self.address = "\0moelink-kv-tp-" + name
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self._lock = threading.Lock()
        self._votes: dict[int, list] = {}  # transfer id -> [the ranks that reported it, all of them ok]
        self._outbox: list[tuple[int, bool]] = []  # a later rank's reports not sent yet
        self._sock: socket.socket | None = None
        self._closed = False
        self._readers: list[threading.Thread] = []
        if tp_rank == 0:
            self._sock = self._bind()
            self._sock.listen(tp_size)
            self._accepter = threading.Thread(target=self._accept, name="kv-tp-join", daemon=True)
            self._accepter.start()

    # ------------------------------------------------------------------ the first rank
    BIND_WAIT_S = 10.0  # how long the name may still be held by the group's previous first rank

    def _bind(self) -> socket.socket:
        """The listening socket under `address`. After an elastic regroup a rebuilt group binds the name its
        previous first rank held, and that process may still be exiting (Ray kills without waiting; a CUDA
        process takes a while): the name is asked again for a bounded time before giving up."""
        deadline = time.monotonic() + self.BIND_WAIT_S
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(self.address)
                return sock
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE or time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            th = threading.Thread(target=self._read, args=(conn,), name="kv-tp-join-peer", daemon=True)
            self._readers.append(th)
            th.start()

    def _read(self, conn: socket.socket) -> None:
        with conn, conn.makefile("r") as lines:
            for line in lines:
                try:
                    tid, rank, ok = line.split()
                    self._vote(int(tid), int(rank), ok == "1")
                except ValueError:
                    logger.warning("KV TP join: a report that is not one: %r", line[:64])

    def _vote(self, tid: int, rank: int, ok: bool) -> None:
        with self._lock:  # a set of ranks: a report sent twice (a send cut and retried) counts once
            v = self._votes.setdefault(tid, [set(), True])
            v[0].add(rank)
            v[1] = v[1] and ok

    def join(self, done: dict[int, bool] | None) -> dict[int, bool] | None:
        """This rank's poll (`done`), joined: on the first rank what every rank has reported, on the others their
        own (sent on to the first rank; the executor drops them)."""
        if self.tp_rank != 0:
            self._send(done)
            return done
        for tid, ok in (done or {}).items():
            self._vote(tid, 0, ok)
        with self._lock:
            out = {tid: v[1] for tid, v in self._votes.items() if len(v[0]) >= self.tp_size}
            for tid in out:
                del self._votes[tid]
        return out or None

    # ------------------------------------------------------------------ the other ranks
    def _send(self, done: dict[int, bool] | None) -> None:
        self._outbox.extend((done or {}).items())
        if not self._outbox:
            return
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.connect(self.address)
                except OSError:
                    sock.close()
                    raise
                self._sock = sock
            self._sock.sendall("".join(f"{tid} {self.tp_rank} {int(ok)}\n" for tid, ok in self._outbox).encode())
            self._outbox = []
        except OSError as exc:  # the first rank not listening yet: the next poll tries again
            logger.debug("KV TP join: reports kept for the next poll: %s", exc)
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def clear(self) -> None:
        """Forget the partial reports (an elastic rewind counted their transfers failed)."""
        with self._lock:
            self._votes.clear()
        self._outbox = []

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        accepter = getattr(self, "_accepter", None)
        if accepter is not None:
            accepter.join(timeout=1.0)  # its accept returns once the socket is shut: the name is free after


__all__ = ["TPJoin"]
