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
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
from multiprocessing import reduction
from multiprocessing.connection import Connection
from typing import Callable, Optional

FORK_ANSWER_TIMEOUT_S = 30.0  # a fork takes milliseconds; the server is broken past this


def supported() -> bool:
    return sys.platform.startswith("linux") and hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


class Forked:
    """A forked compile process, by pidfd: what grammar_compile.py asks of a subprocess.Popen (poll, kill, wait)."""

    def __init__(self, pid: int, pidfd: int):
        self.pid = pid
        self._pidfd: Optional[int] = pidfd
        self.returncode: Optional[int] = None  # -9 once it is known to have exited (its status is the fork server's)

    def poll(self) -> Optional[int]:
        if self.returncode is None and self._exited(0):
            self._done()
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None and self._pidfd is not None:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:  # it exited already
                pass

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            if not self._exited(timeout):
                raise subprocess.TimeoutExpired(f"grammar compile process {self.pid}", timeout)
            self._done()
        return self.returncode

    def _exited(self, timeout: Optional[float]) -> bool:
        # A pidfd reads ready once its process has exited.
        return self._pidfd is None or bool(select.select([self._pidfd], [], [], timeout)[0])

    def _done(self) -> None:
        self.returncode = -signal.SIGKILL
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self):
        if self._pidfd is not None:
            os.close(self._pidfd)


class ForkServer:
    """Starts the fork server on the first `fork` (seconds: it imports xgrammar), and again if it died."""

    def __init__(self, tokenizer_info_json: Callable[[], str], start_timeout_s: float):
        self._info_json = tokenizer_info_json
        self.start_timeout_s = start_timeout_s
        self._lock = threading.Lock()  # one fork at a time: the requests and answers share one socket
        self._proc: Optional[subprocess.Popen] = None
        self._conn: Optional[Connection] = None
        self._closed = False

    def fork(self) -> tuple[Forked, Connection]:
        """A new compile process and the socket to it; it answers b"ready" on it, then runs the compile protocol
        (grammar_child.py). RuntimeError when the fork server cannot start or was closed."""
        with self._lock:
            for attempt in range(2):  # a fork server that died (killed, out of memory) is started again, once
                if self._closed:
                    raise RuntimeError("the grammar compiler is shut down")
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
                    if attempt:
                        raise RuntimeError("the grammar compile fork server failed twice (its log is the server's "
                                           "stderr)") from None
                    continue
                finally:
                    child.close()
                return Forked(pid, pidfd), Connection(parent.detach())

    def _start(self) -> None:
        self._stop()
        parent, child = socket.socketpair()
        # It imports moelink the way this process did (a checkout on sys.path, or the installed package).
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moelink.engine.core.grammar_child", "--fork-server", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env)
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        # After the start: building the info here (importing xgrammar, the first time) overlaps its imports.
        self._conn.send_bytes(self._info_json().encode())
        try:
            ready = self._conn.poll(self.start_timeout_s) and self._conn.recv_bytes() == b"ready"
        except (EOFError, OSError):
            ready = False
        if not ready:
            self._stop()
            raise RuntimeError(f"the grammar compile fork server did not start within {self.start_timeout_s:g} s "
                               "(its log is the server's stderr)")

    def _stop(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        """Kill the fork server (its children die with it); any thread may call it."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
        if self._lock.acquire(timeout=5):  # a fork in progress reads EOF and gives up
            try:
                self._stop()
            finally:
                self._lock.release()
