"""The grammar compile processes' fork server: one process that has imported xgrammar forks each compile process.

Why: a compile that runs past its limit, or whose clients all left, is ended by killing its process
(grammar_compile.py), and a new process importing xgrammar (torch and transformers with it) takes seconds of
CPU: a client that hangs up on an expensive regex once a second kept every other user's structured request
waiting for a start (5.7 s for a 20 ms request, issue 41 medium 5). A fork of a process that has xgrammar
imported and the tokenizer info built is ready in milliseconds, and the forks share its memory.

The fork server is `python -m moelink.engine.core.grammar_child --fork-server FD` (niced, dies with this
process). For each fork it is sent one end of a new socket pair and answers the child's PID and a pidfd: the
pool signals the child through the pidfd, which names that process and no other even after it exits (the fork
server reaps its children, so a bare PID could be reused). Where pidfds do not exist, `supported()` is False
and the pool starts each process itself (grammar_compile.py).

`moelink serve` forks its fork server instead (`prefork()`, while the process is still single-threaded, before the
engine is built): an exec'd one imports torch, transformers and xgrammar again (2.1 s of CPU per server start, as
much as the rest of the start), which the server process has imported anyway. The fork runs the same
`grammar_child.main` as the exec'd one; a fork server that dies later is exec'd as before.

A pool that shuts down keeps its fork server (idle: no compile process of its own left) for the next pool of this
process with the same tokenizer info, at most IDLE_MAX of them (the oldest ended first), and ended at exit: a
process that builds engine after engine (a notebook, the test suite: 14 fork servers exec'd in 7 test files, ~2.7 s
of CPU each) imports xgrammar once per tokenizer, not once per engine. The exec'd ones are started from a
thread that lives as long as the process (`engine/contract/child_process.py`): the kernel's parent-death signal (grammar_child.py's
PR_SET_PDEATHSIG) follows the *thread* that started a child, so one started from a compile worker's thread died
with that thread.
"""
from __future__ import annotations

import atexit
import collections
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import reduction
from multiprocessing.connection import Connection

from typing import Callable, Optional

from ..contract.child_process import ForkedChild, end_forked, exec_child, fork_child

FORK_ANSWER_TIMEOUT_S = 30.0  # a fork takes milliseconds; the server is broken past this


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


class Forked:
    """A forked compile process, by pidfd: what grammar_compile.py asks of a subprocess.Popen (poll, kill, wait).

    Any thread may call it: the pool kills a worker's process from the thread where its last client left (or
    from shutdown) while the worker's own thread polls, waits for and reaps the same process. So the pidfd is
    used and closed under a lock, closed once, and never used once closed: a second close, or a signal or a
    poll through a number already closed, hit whatever the process had opened under that number since (a
    socket, gRPC's epoll descriptor) or raised `OSError: [Errno 9] Bad file descriptor` (issue 54 item 8).
    A wait blocks on a duplicate of the pidfd, its own, so that it holds no lock while it waits."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self._lock = threading.Lock()
        self._pidfd: Optional[int] = pidfd
        self.returncode: Optional[int] = None  # -9 once it is known to have exited (its status is the fork server's)

    def poll(self) -> Optional[int]:
        with self._lock:
            if self.returncode is None and (self._pidfd is None or _readable(self._pidfd, 0)):
                self._done()
            return self.returncode

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None and self._pidfd is not None:
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except ProcessLookupError:  # it exited already
                    pass

    def wait(self, timeout: Optional[float] = None) -> int:
        with self._lock:
            if self.returncode is not None:
                return self.returncode
            if self._pidfd is None:
                self._done()
                return self.returncode
            fd = os.dup(self._pidfd)
        try:
            exited = _readable(fd, timeout)
        finally:
            os.close(fd)
        if not exited:
            raise subprocess.TimeoutExpired(f"grammar compile process {self.pid}", timeout)
        with self._lock:
            if self.returncode is None:
                self._done()
            return self.returncode

    def _done(self) -> None:
        # Holding the lock.
        self.returncode = -signal.SIGKILL
        pidfd, self._pidfd = self._pidfd, None
        if pidfd is not None:
            os.close(pidfd)

    def __del__(self):
        pidfd, self._pidfd = getattr(self, "_pidfd", None), None
        if pidfd is not None:
            os.close(pidfd)


def _readable(fd: int, timeout: Optional[float]) -> bool:
    """Whether `fd` reads ready within `timeout` seconds (None: waits). A pidfd reads ready once its process has
    exited. poll, not select: a server with many connections has descriptors past select's 1024."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0, math.ceil(timeout * 1000))))


_preforked: Optional[tuple[ForkedChild, socket.socket]] = None


def prefork() -> bool:
    """Fork the fork server from this process now, for the next ForkServer to adopt (module docstring). Only while
    this process has one thread (a fork copies no other thread, and a lock another thread holds stays held in the
    child); without xgrammar or pidfds, nothing. Returns whether it forked."""
    global _preforked
    import importlib.util

    if _preforked is not None or not supported() or importlib.util.find_spec("xgrammar") is None:
        return _preforked is not None
    import xgrammar  # noqa: F401  (the fork inherits it: the point of forking; the engine imports it anyway)

    _preforked = fork_child(_run_fork_server, "grammar compile fork server")
    return _preforked is not None


def _run_fork_server(fd: int) -> None:
    from . import grammar_child

    grammar_child.main(fd, fork_server=True)


def discard_prefork() -> None:
    """End a preforked fork server no ForkServer adopted (a server without a tokenizer compiles no grammar)."""
    global _preforked
    taken, _preforked = _preforked, None
    end_forked(taken)


IDLE_MAX = 2  # kept fork servers of shut-down pools (module docstring); each holds xgrammar's imports in memory
_idle: collections.OrderedDict[str, tuple] = collections.OrderedDict()  # tokenizer info JSON -> (process, socket)
_idle_lock = threading.Lock()


def _end(proc, conn: Optional[Connection]) -> None:
    """End a fork server: close its pipe (it reads EOF and exits), kill it if it has not, reap it."""
    if conn is not None:
        conn.close()
    if proc is None:
        return
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


def _park(info: str, proc, conn: Connection) -> None:
    """Keep an idle fork server for the next pool with tokenizer info `info`."""
    with _idle_lock:
        old = _idle.pop(info, None)
        _idle[info] = (proc, conn)
        evicted = [_idle.popitem(last=False)[1] for _ in range(len(_idle) - IDLE_MAX)]
    for p, c in evicted + ([old] if old is not None else []):
        _end(p, c)


def _take_idle(info_json: Callable[[], str]) -> Optional[tuple[str, object, Connection]]:
    """A kept fork server for this tokenizer info (built only when some are kept), alive, or None."""
    if not _idle:
        return None
    info = info_json()
    with _idle_lock:
        kept = _idle.pop(info, None)
    if kept is None:
        return None
    if kept[0].poll() is not None:  # died while kept (killed from outside)
        _end(*kept)
        return None
    return (info, *kept)


def discard_idle() -> None:
    """End every kept fork server (at exit; a caller that wants none left now)."""
    with _idle_lock:
        kept = list(_idle.values())
        _idle.clear()
    for proc, conn in kept:
        _end(proc, conn)


atexit.register(discard_idle)


class ForkServerClosed(RuntimeError):
    """The fork server was closed (the pool shuts down): no fork, and nothing to report."""


class ForkServer:
    """Starts the fork server on the first `fork` (seconds: it imports xgrammar; one `prefork()` forked is adopted
    instead), and again if it died."""

    def __init__(self, tokenizer_info_json: Callable[[], str], start_timeout_s: float):
        self._info_json = tokenizer_info_json
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()  # one fork at a time: the requests and answers share one socket
        self._proc: Optional[subprocess.Popen | ForkedChild] = None
        self._conn: Optional[Connection] = None
        self._info: Optional[str] = None  # the tokenizer info the running fork server was sent
        self._closed = False

    def fork(self) -> tuple[Forked, Connection]:
        """A new compile process and the socket to it; it answers b"ready" on it, then runs the compile protocol
        (grammar_child.py). RuntimeError when the fork server cannot start or was closed."""
        with self._lock:
            for attempt in range(2):  # a fork server that died (killed, out of memory) is started again, once
                if self._closed:
                    raise ForkServerClosed("the grammar compiler is shut down")
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                parent, child = socket.socketpair()
                try:
                    self._conn.send_bytes(b"fork")
                    reduction.send_handle(self._conn, child.fileno(), self._proc.pid)
                    if not self._conn.poll(FORK_ANSWER_TIMEOUT_S):
                        raise OSError("no answer")
                    pid = int(self._conn.recv_bytes())
                    if pid < 0:
                        raise OSError("the fork failed")
                    pidfd = reduction.recv_handle(self._conn)
                except (EOFError, OSError, ValueError):
                    parent.close()
                    self._stop()
                    if self._closed:  # killed by close() meanwhile
                        raise ForkServerClosed("the grammar compiler is shut down") from None
                    if attempt:
                        raise RuntimeError("the grammar compile fork server failed twice (its log is the server's "
                                           "stderr)") from None
                    continue
                finally:
                    child.close()
                return Forked(pid, pidfd), Connection(parent.detach())
            raise AssertionError("unreachable: the second failed attempt raised")

    def _start(self) -> None:
        global _preforked
        self._stop()
        taken, _preforked = _preforked, None
        kept = _take_idle(self._info_json) if taken is None else None
        if kept is not None:  # a shut-down pool's, for the same tokenizer info: ready already
            self._info, self._proc, self._conn = kept
            return
        if taken is not None:  # forked by prefork(): xgrammar imported already
            self._proc, parent = taken
        else:
            self._proc, parent = exec_child("moelink.engine.core.grammar_child", lambda fd: ["--fork-server", str(fd)])
        self._conn = Connection(parent.detach())
        # After the start: building the info here (importing xgrammar, the first time) overlaps its imports.
        self._info = self._info_json()
        self._conn.send_bytes(self._info.encode())
        try:
            ready = self._conn.poll(self.start_timeout_s) and self._conn.recv_bytes() == b"ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            code = self._proc.poll()
            self._stop()
            if self._closed:  # killed by close() while it started (a server stopping early): nothing went wrong
                raise ForkServerClosed("the grammar compiler is shut down")
            if code is not None:
                raise RuntimeError(f"the grammar compile fork server exited with {code} as it started (its log is "
                                   "the server's stderr)")
            raise RuntimeError(f"the grammar compile fork server did not start within {self.start_timeout_s:g} s "
                               "(its log is the server's stderr)")

    def _stop(self) -> None:
        proc, conn, self._proc, self._conn, self._info = self._proc, self._conn, None, None, None
        _end(proc, conn)

    def close(self) -> None:
        """Kill the fork server (its children die with it), or keep it for the next pool (module docstring) when it
        is idle: up and no fork in progress; any thread may call it."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None and self._lock.acquire(blocking=False):
            try:  # holding the lock: no fork and no start in progress, so a running fork server answered `ready`
                if self._proc is proc and self._info is not None:
                    info, conn, self._proc, self._conn, self._info = self._info, self._conn, None, None, None
                    _park(info, proc, conn)
                    return
                self._stop()
            finally:
                self._lock.release()
            return
        if proc is not None and proc.poll() is None:
            proc.kill()
        if self._lock.acquire(timeout=5):  # a fork in progress reads EOF and gives up
            try:
                self._stop()
            finally:
                self._lock.release()
