"""A rank's end of a trainer's weight broadcast (engine/contract/weight_sync.py; docs/rl.md): the groups it joined,
by name, and the receive of one update, a bucket at a time, each bucket written in place through the rank's load plan
(loader.update_tensors_in_place: its experts, its TP slice; nothing else is kept).

Failures are answered, not raised (a raised error is a rank's death to the Ray executor). Before a bucket is written,
the bytes it overwrites are saved to the update's undo log (engine/rl/rank/rollback.py, at most `rollback_bytes`); a
failed update restores them, so the weights are bitwise as before: a trainer that dies or stays silent past the
group's timeout (the tensor being received is named, and the group is dropped: a gloo or NCCL group that failed once
is not reused), or a bucket that cannot be written (a NaN, the undo log's limit: the rest of the broadcast is received
and dropped, and the group stays). A rank that wrote everything keeps its log until the driver's `finish`: it rolls
back too when another rank failed (engine/rl/control.py). With `rollback_bytes=0` the buckets written before a
failure stay written, and the driver refuses to serve until a complete update lands.

A join runs on a thread of its own (`join` returns at once; the driver polls `join_status` between steps): the rank
steps on meanwhile, and a trainer's address that never answers holds that thread only. The name is resolved and the
port connected to in Python first (a name that does not resolve fails at once; a refused port is retried for up to
REFUSED_GRACE_S, the trainer may be about to listen; a listener that speaks first is no torch store and fails at
once), then torch's rendezvous runs: its store client ignores its
timeout against a listener that accepts and never answers (torch 2.13), so the driver's join_timeout_s is the bound
the caller sees, and a join the driver dropped (`destroy`) discards its group if it ever forms.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch

from moelink.comm.process_group import side_group

from ..requantize import requantize
from ...contract.weight_sync import DistributedUpdate, DistributedUpdateResult, JoinStatus, UpdateGroupSpec
from .rollback import UndoLog, finish, roll_back

logger = logging.getLogger(__name__)

# a bucket's tensors written in place, the bytes they overwrite saved to the undo log first (None: no rollback)
WriteBucket = Callable[[dict[str, torch.Tensor], "UndoLog | None"], int]


# Joins whose threads may be alive at once on one rank, those the driver dropped included (a thread inside torch's
# store client stays there until the listener closes): a caller naming silent listeners again and again holds a few
# threads and sockets, never more.
MAX_JOIN_THREADS = 4
_CONNECT_RETRY_S = 0.2  # between two connects refused (the trainer's store may be about to listen)
# A port refused this long (or the join's timeout, if shorter) fails the join: the trainer makes its store as it asks
# the engine to join, seconds apart at most.
REFUSED_GRACE_S = 10.0
_FIRST_WORD_S = 0.05  # a listener that speaks within this of the connect is not a torch store (which waits)


@dataclass
class _Join:
    """One join's thread and what it found (its fields written under UpdateGroups._lock)."""

    spec: UpdateGroupSpec
    thread: threading.Thread | None = None
    phase: str = "resolving"
    done: bool = False
    dropped: bool = False  # the driver gave up on it: a group that forms later is discarded
    error: str | None = None
    group: tuple | None = None  # (backend group, its store)


class UpdateGroups:
    """The trainer groups one rank has joined, by group name, and the joins still under way."""

    def __init__(self, device: torch.device):
        self.device = device
        self._groups: dict[str, tuple] = {}  # name -> (backend group, its store, spec)
        self._pending: UndoLog | None = None  # the last update's undo log, until the driver's finish
        self._joins: dict[str, _Join] = {}  # joins under way, by group name
        self._threads: list[threading.Thread] = []  # join threads, those of dropped joins too, until they end
        self._lock = threading.Lock()

    def join(self, spec: UpdateGroupSpec, rank: int) -> str | None:
        """Begin joining `spec`'s group as rank_offset + `rank` on a thread of its own; None, or why it cannot
        begin. `join_status` says how it stands."""
        if spec.group_name in self._groups:
            return f"group_name={spec.group_name!r} is already joined: destroy it first."
        if spec.group_name in self._joins:
            return f"group_name={spec.group_name!r} is being joined already."
        if spec.backend == "nccl" and self.device.type != "cuda":
            return f"backend='nccl' is invalid on a {self.device.type} rank: use 'gloo'."
        self._threads = [t for t in self._threads if t.is_alive()]
        if len(self._threads) >= MAX_JOIN_THREADS:
            return (f"{len(self._threads)} earlier joins are still waiting for trainers that accepted a connection "
                    "and never answered (each ends when its listener closes): try again later.")
        entry = _Join(spec)
        entry.thread = threading.Thread(target=self._run_join, args=(entry, rank), daemon=True,
                                        name=f"moelink-join-{spec.group_name}"[:60])
        self._joins[spec.group_name] = entry
        self._threads.append(entry.thread)
        entry.thread.start()
        return None

    def _run_join(self, entry: _Join, rank: int) -> None:
        """The join's thread: resolve, connect, then torch's rendezvous; the outcome kept for join_status."""
        spec = entry.spec
        group = error = None
        try:
            _reachable(spec, entry, time.monotonic() + spec.join_timeout_s)
            entry.phase = "rendezvous"
            group = side_group(spec.master_address, spec.master_port, spec.rank_offset + rank, spec.world_size,
                               spec.group_name, spec.backend, spec.timeout_s, self.device,
                               store_timeout_s=spec.join_timeout_s)
        except _Unreachable as exc:
            error = str(exc)
        except Exception as exc:  # torch's rendezvous failed (a garbage answer, a timeout it honoured)
            said = str(exc).strip()  # torch appends its C++ stack: the first line says it
            error = f"{type(exc).__name__}: {said.splitlines()[0][:300] if said else 'no reason given'}"
        with self._lock:
            entry.done = True
            if entry.dropped:  # nobody waits for it any more: a group that formed late is let go
                group = None
            entry.group, entry.error = group, error

    def join_status(self, group_name: str) -> JoinStatus:
        """How this rank's end of `group_name` stands; a finished join becomes a joined group (or its failure) here."""
        with self._lock:
            entry = self._joins.get(group_name)
            if entry is None:
                return JoinStatus("joined") if group_name in self._groups else JoinStatus(
                    "failed", error=f"no join of group {group_name!r} is under way on this rank.")
            if not entry.done:
                return JoinStatus("joining", entry.phase)
            del self._joins[group_name]
        if entry.error is not None or entry.group is None:
            return JoinStatus("failed", error=entry.error or "the join ended without a group.")
        self._groups[group_name] = (*entry.group, entry.spec)
        return JoinStatus("joined")

    def destroy(self, group_name: str) -> bool:
        """Leave the group, or drop its join still under way (its thread, where torch holds it, is left to end;
        a group it makes is let go); False when this rank had neither."""
        with self._lock:
            entry = self._joins.pop(group_name, None)
            if entry is not None:
                entry.dropped = True
                entry.group = None
        return self._groups.pop(group_name, None) is not None or entry is not None

    def receive(self, update: DistributedUpdate, write: WriteBucket) -> DistributedUpdateResult:
        """Every tensor of `update` from the trainer's broadcast, a bucket at a time, each bucket handed to `write`
        (with the undo log it saves the overwritten bytes to first) before the next is received. A bucket that
        cannot be written (a NaN, a tensor its format cannot take, the undo log's limit) fails the update: what was
        written is restored at once, and the rest of the broadcast is received and dropped, so the trainer's
        broadcast ends and the group stays usable. A trainer that dies fails it too, and the group is left."""
        self._pending = None
        entry = self._groups.get(update.group_name)
        if entry is None:
            return DistributedUpdateResult(0, 0, f"group_name={update.group_name!r} is not a joined group.")
        group = entry[0]
        on = self.device if entry[2].backend == "nccl" else torch.device("cpu")
        undo = UndoLog(update.rollback_bytes) if update.rollback_bytes else None
        received = written = 0
        failure: str | None = None
        failed: DistributedUpdateResult | None = None
        for bucket in update.buckets():
            tensors: dict[str, torch.Tensor] = {}
            # packed (vLLM's): the bucket is one uint8 buffer, received whole, then cut into its tensors
            for i, name, buf in (_packed(update, bucket, on) if update.packed else _whole(update, bucket, on)):
                try:
                    group.broadcast(buf, 0).wait()
                except Exception as exc:  # the trainer died or went silent: this group is done
                    self.destroy(update.group_name)
                    logger.warning("weight update from group %r failed at tensor %r: %s", update.group_name, name, exc)
                    why = failure or (f"receiving tensor {name!r} from group {update.group_name!r} failed "
                                      f"({type(exc).__name__}: {str(exc)[:200]}); the group is destroyed")
                    return self._failed(undo, received, written, why, group_lost=True)
                received += buf.numel() * buf.element_size()
                if failure is None:  # after a failure the rest is received and dropped (the trainer's broadcast ends)
                    if update.packed:
                        tensors.update(_unpacked(update, bucket, buf))
                    else:
                        tensors[name] = buf
            if failure is not None:
                continue
            try:
                _check_nan(tensors, {n for n, _ in update.requantize})
                for name, spec in update.requantize:  # a float weight the checkpoint holds quantized
                    if name in tensors:
                        tensors.update(requantize(name, spec, tensors.pop(name)))
                write(tensors, undo)
                written += len(tensors)
            except Exception as exc:
                failed = self._failed(undo, received, written, f"writing the bucket of {sorted(tensors)[0]!r} failed: "
                                                                   f"{exc}", group_lost=False)
                failure = failed.error
            del tensors  # the bucket goes before the next is received
        if failed is not None:
            return replace(failed, bytes_received=received)
        self._pending = undo
        return DistributedUpdateResult(received, written)

    def finish(self, commit: bool) -> str | None:
        """The driver's word on the last update, once every rank answered: keep it, or restore the bytes it
        overwrote (another rank failed). None, or why the restore failed."""
        undo, self._pending = self._pending, None
        return finish(undo, commit)

    @staticmethod
    def _failed(undo: UndoLog | None, received: int, written: int, why: str,
                group_lost: bool) -> DistributedUpdateResult:
        """Roll this rank back at once (where it keeps an undo log); the answer naming why."""
        error = roll_back(undo)
        rolled = undo is not None and error is None
        if error is not None:
            why = f"{why}; {error}"
        return DistributedUpdateResult(received, written, why, rolled_back=rolled, group_lost=group_lost)


def _whole(update: DistributedUpdate, bucket: list[int], on: torch.device):
    """Each tensor of the bucket, broadcast whole: (index, name, its receive buffer)."""
    for i in bucket:
        name, dtype, shape = update.tensors[i]
        yield i, name, torch.empty(shape, dtype=dtype, device=on)


def _nbytes(dtype: torch.dtype, shape) -> int:
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def _packed(update: DistributedUpdate, bucket: list[int], on: torch.device):
    """The bucket as vLLM's packed broadcast sends it: one uint8 buffer of its tensors' bytes back to back."""
    total = sum(_nbytes(update.tensors[i][1], update.tensors[i][2]) for i in bucket)
    yield bucket[0], update.tensors[bucket[0]][0], torch.empty(total, dtype=torch.uint8, device=on)


def _unpacked(update: DistributedUpdate, bucket: list[int], buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """A packed bucket's buffer cut into its tensors (each its own contiguous copy of its bytes)."""
    out, at = {}, 0
    for i in bucket:
        name, dtype, shape = update.tensors[i]
        size = _nbytes(dtype, shape)
        out[name] = buf[at:at + size].clone().view(dtype).view(shape)
        at += size
    return out


def _check_nan(tensors: dict[str, torch.Tensor], requantized: set[str]) -> None:
    """Every rank checks every float tensor it received (also those it does not keep), so all ranks fail the same
    bucket: a NaN or inf weight would answer garbage. Re-quantized ones are checked by their format (requantize)."""
    for name, t in tensors.items():
        if name not in requantized and t.is_floating_point() and t.dtype != torch.float8_e4m3fn \
                and not bool(torch.isfinite(t).all()):  # host sync: an update-time check (inf too, as the loader)
            nan = int(torch.isnan(t).sum())
            what = f"{nan} NaN value(s)" if nan else f"{int(torch.isinf(t).sum())} infinite value(s)"
            raise ValueError(f"tensor {name!r} holds {what} of {t.numel()}.")


class _Unreachable(Exception):
    """The trainer's address did not resolve, or nothing accepted a connection there in time."""


def _reachable(spec: UpdateGroupSpec, entry: _Join, deadline: float) -> None:
    """Resolve the trainer's address and wait for its port to accept a connection, in Python with real timeouts,
    before torch's store client (which retries a refused port past its timeout, and waits for ever on a listener that
    never answers): a name that does not resolve fails at once; a port refused for REFUSED_GRACE_S (the trainer makes
    its store as it asks the engine to join: seconds apart at most) fails then; a listener that speaks first (a torch
    store never does: its client speaks first) or hangs up at once is not a trainer's store, and fails at once."""
    where = f"{spec.master_address}:{spec.master_port}"
    try:
        infos = socket.getaddrinfo(spec.master_address, spec.master_port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _Unreachable(f"master_address={spec.master_address!r} does not resolve "
                           f"({getattr(exc, 'strerror', None) or exc}).") from None
    entry.phase = "connecting"
    family, kind, proto, _, addr = infos[0]
    refused_since: float | None = None
    grace = min(REFUSED_GRACE_S, spec.join_timeout_s)
    while True:
        now = time.monotonic()
        if refused_since is not None and (now - refused_since >= grace or now >= deadline):
            raise _Unreachable(f"nothing listens at {where} (connection refused for {now - refused_since:.1f} s): is "
                               "the trainer listening?")
        if now >= deadline:
            raise _Unreachable(f"nothing accepted a connection at {where} within {spec.join_timeout_s:g} s: is the "
                               "trainer listening?")
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.settimeout(min(deadline - now, 5.0))
                sock.connect(addr)
                sock.settimeout(_FIRST_WORD_S)
                try:
                    said = sock.recv(1)
                except (socket.timeout, BlockingIOError):
                    return  # silent until spoken to, as a torch store is
                raise _Unreachable(f"the listener at {where} is not a torch.distributed store: it "
                                   + ("sent data before it was asked anything." if said else
                                      "closed the connection at once."))
        except ConnectionRefusedError:
            refused_since = now if refused_since is None else refused_since
        except OSError:  # no route, a timeout: tried again until the deadline
            refused_since = None
        time.sleep(min(_CONNECT_RETRY_S, max(deadline - time.monotonic(), 0)))


__all__ = ["MAX_JOIN_THREADS", "REFUSED_GRACE_S", "UpdateGroups"]
