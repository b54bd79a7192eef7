"""Child processes the engine starts and owns: `keeper_popen` and `exec_child` (exec'd), `fork_child` and
`ForkedChild` (forked).

`keeper_popen`: subprocess.Popen run on one daemon thread that lives as long as the process. Why: the kernel's parent-death signal (PR_SET_PDEATHSIG, which the grammar compile processes and the multiprocess
executor's rank process arm) follows the *thread* that started a child, not the process: a child started from a
compile worker's thread, or from the thread an engine was built on, would be killed when that thread ends.
"""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional

_lock = threading.Lock()
_jobs: Optional[queue.SimpleQueue] = None


def keeper_popen(*args, **kwargs) -> subprocess.Popen:
    """subprocess.Popen(*args, **kwargs), started from the process-lived keeper thread (module docstring)."""
    global _jobs
    with _lock:
        if _jobs is None:
            _jobs = queue.SimpleQueue()
            threading.Thread(target=_keep, args=(_jobs,), name="moelink-popen-keeper", daemon=True).start()
        jobs = _jobs
    done: Future = Future()
    jobs.put((done, args, kwargs))
    return done.result()


def _keep(jobs: queue.SimpleQueue) -> None:
    while True:
        done, args, kwargs = jobs.get()
        try:
            done.set_result(subprocess.Popen(*args, **kwargs))
        except BaseException as e:  # handed to the caller's thread
            done.set_exception(e)


def exec_child(module: str, argv: Callable[[int], list[str]]) -> tuple[subprocess.Popen, socket.socket]:
    """`python -m module *argv(fd)` started by keeper_popen with its end of a new socket pair as `fd`; returns it and
    this process's end. It imports moelink the way this process did (a checkout on sys.path, or the installed
    package); its stdin is /dev/null, as a forked child's."""
    parent, child = socket.socketpair()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    try:
        proc = keeper_popen([sys.executable, "-m", module, *argv(child.fileno())], pass_fds=(child.fileno(),),
                            stdin=subprocess.DEVNULL, env=env)
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
    return proc, parent


class ForkedChild:
    """A direct child made by os.fork: what a subprocess.Popen's owner asks of it (pid, poll, kill, wait)."""

    def __init__(self, pid: int, what: str = "forked child"):
        self.pid, self.what = pid, what
        self.returncode: Optional[int] = None
        self._lock = threading.Lock()

    def poll(self) -> Optional[int]:
        with self._lock:
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere (a SIGCHLD handler): gone, status unknown
                    self.returncode = -signal.SIGKILL
                else:
                    if pid:
                        self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def kill(self) -> None:
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def wait(self, timeout: Optional[float] = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"{self.what} {self.pid}", timeout)
            time.sleep(0.01)
        return code


def fork_child(run: Callable[[int], None], what: str) -> Optional[tuple[ForkedChild, socket.socket]]:
    """Fork a child that runs `run(fd)` on its end of a new socket pair and exits; returns it and this process's
    end, or None when this process has more than one thread (a fork copies no other thread, and a lock another
    thread holds stays held in the child). The child's stdin is /dev/null, as an exec'd child's."""
    if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
        return None
    parent, child = socket.socketpair()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller
        code = 1
        try:
            import gc

            # The parent's objects are never collected here: no finalizer of theirs runs, their pages stay shared.
            gc.freeze()
            parent.close()
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            run(child.detach())
            code = 0
        finally:
            os._exit(code)
    child.close()
    return ForkedChild(pid, what), parent


def end_forked(taken: Optional[tuple[ForkedChild, socket.socket]]) -> None:
    """End a child `fork_child` made that nobody adopted: its socket closed (it reads EOF), then killed."""
    if taken is not None:
        proc, sock = taken
        sock.close()
        proc.kill()
        proc.wait(5)
