"""The rank process of the multiprocess executor: `python -m moelink.engine.cluster.mp_rank FD PARENT_PID`, started by
engine/cluster/mp_executor.py; it holds the one Worker of an engine whose executor is "mp".

Protocol on the socket FD (multiprocessing.connection framing, each message one pickle): the parent first sends
`("start", WorkerConfig, ExpertParallelPlan, eager)` (eager None: the device decides, below); the rank builds and
loads its Worker and answers `("ok", RankHello)` or `("err", exception, traceback text)`. Then, in order:

* `("launch", SchedulerOutput, run_forward)`: Worker.launch. A rank whose device runs work inline (a CPU rank:
  engine/rank/device_stream.py's InlineStream) collects the step at once and answers its ModelRunnerOutput
  unasked ("eager"), so the parent's next step is in the pipe while the parent processes this one's tokens. A
  GPU rank answers nothing here: the parent sends `("collect", step_id)` after its next launch, so the rank
  queues step N+1's device work before it waits on step N (Ray's ranks keep the same order).
* `("collect", step_id)`: Worker.collect's ModelRunnerOutput (or the error its launch or collect raised).
* `("call", name, args)`: the Worker method `name` (engine/contract/worker_api.RankCall), its result.
* `("stop",)`: the runner's stream, plug-ins and memory released; answers `("ok", None)` and exits.

Every answer is `("ok", value)` or `("err", exception, traceback text)` (a value that does not pickle answers its
error), written by a thread of its own (`Answers`: the rank never blocks its reads on a send). The rank ends when
the parent's end of the socket closes and with its parent (PR_SET_PDEATHSIG; a parent gone before that was armed
is seen by its PID).

`moelink serve` forks the rank process instead when it can (`prefork()`, while the server is still single-threaded,
before the engine is built: a server forked from a process with torch imported, as the test suite's zygote forks
them), with torch and the rank's modules imported: an exec'd rank imports them again (~2-3 s of CPU per start). The
fork runs the same `main`; the executor adopts it (`take_prefork`), and a server that builds no engine ends it
(`discard_prefork`). A server started from a shell has numpy's OpenBLAS thread by then and exec's (docs/serving.md#the-rank-process).
"""
from __future__ import annotations

import os
import pickle
import socket
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Callable, Optional

from ..contract.child_process import ForkedChild, end_forked, fork_child


@dataclass(frozen=True)
class RankHello:
    """What the rank process answers `start` with: its PID and whether it answers steps unasked (eager)."""

    pid: int
    eager: bool


def dumps(msg: tuple) -> bytes:
    """An answer's bytes; one whose value does not pickle becomes that error's answer (the rank goes on)."""
    try:
        return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        return pickle.dumps(error_reply(exc), protocol=pickle.HIGHEST_PROTOCOL)


class Answers:
    """The rank's answers, written by a thread of their own in the order given. Why: a CPU rank answers each step
    unasked while the parent may be sending the next step; were both messages larger than the socket's buffer and
    both sides blocked in a send, neither would read (a step's logprobs against a long prompt's launch)."""

    def __init__(self, conn: Connection):
        import queue
        import threading

        self.conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, name="mp-rank-answers", daemon=True)
        self._thread.start()

    def put(self, msg: tuple) -> None:
        self._queue.put(dumps(msg))

    def close(self) -> None:
        """Every answer put so far written (or the socket gone), then the writer ends."""
        self._queue.put(None)
        self._thread.join()

    def _write(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError:
                return  # the parent is gone: the read loop ends on its EOF


def error_reply(exc: BaseException) -> tuple:
    """`("err", exc, traceback)`, the exception itself when it pickles, else a RuntimeError naming it."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return ("err", exc.with_traceback(None), tb)


def _die_with_parent(parent: int) -> None:
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent was gone before the signal was armed (reparented: to init or a
            os._exit(1)  # subreaper)


class RankLoop:
    """Applies the parent's messages to one Worker, in order (module docstring)."""

    def __init__(self, conn: Connection, worker, eager: bool, answers: Answers):
        self.conn, self.worker, self.eager, self.answers = conn, worker, eager, answers
        self.failed: dict[int, tuple] = {}  # step id -> the error its launch raised, answered at its collect

    def run(self) -> None:
        try:
            self._loop()
        finally:
            self.answers.close()

    def _loop(self) -> None:
        answer = self.answers.put
        while True:
            try:
                msg = pickle.loads(self.conn.recv_bytes())
            except (EOFError, OSError):
                return  # the parent is gone
            op = msg[0]
            if op == "launch":
                self._launch(msg[1], msg[2])
            elif op == "collect":
                answer(self._collect(msg[1]))
            elif op == "call":
                answer(self._call(msg[1], msg[2]))
            elif op == "stop":
                self.worker.close_runner()
                answer(("ok", None))
                return
            else:
                answer(("err", ValueError(f"mp rank: unknown message {op!r}"), ""))

    def _launch(self, so, run_forward: bool) -> None:
        try:
            self.worker.launch(so, run_forward)
        except BaseException as exc:
            self.failed[so.step_id] = error_reply(exc)
        if self.eager:
            self.answers.put(self._collect(so.step_id))

    def _collect(self, step_id: int) -> tuple:
        failed = self.failed.pop(step_id, None)
        if failed is not None:
            return failed
        try:
            return ("ok", self.worker.collect(step_id))
        except BaseException as exc:
            return error_reply(exc)

    def _call(self, name: str, args: tuple) -> tuple:
        try:
            result = getattr(self.worker, name)(*args)
        except BaseException as exc:
            return error_reply(exc)
        return ("ok", result)


def main(fd: int, parent: int) -> None:
    """The rank process: `parent` is the engine process's PID (the rank ends when it does)."""
    import signal

    # Ctrl-C reaches the whole foreground process group: the engine process stops this rank in its shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    conn = Connection(fd)
    try:
        msg = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return
    if not (isinstance(msg, tuple) and len(msg) == 4 and msg[0] == "start"):
        return  # the parent gave up before the start (an engine that failed to start kills this process)
    _, worker_config, plan, eager = msg
    answers = Answers(conn)
    try:
        from ..rank.worker import Worker
        from .step_features import STEP_FEATURES

        Worker.own_process = True
        worker = Worker(worker_config, rank=0, plan=plan, step_features=STEP_FEATURES)
        worker.load()
        if eager is None:
            eager = worker.device.type != "cuda"  # a CPU rank's stream runs the step inline (device_stream.py)
    except BaseException as exc:
        answers.put(error_reply(exc))
        answers.close()
        return
    answers.put(("ok", RankHello(pid=os.getpid(), eager=eager)))
    loop = RankLoop(conn, worker, eager, answers)
    profile_to = os.environ.get("MOELINK_RANK_PROFILE")
    if profile_to:  # a developer's profile of the rank's loop (docs/benchmarks.md#profiling-the-served-path)
        _profiled(loop.run, profile_to)
    else:
        loop.run()


def _profiled(run: Callable[[], None], path: str) -> None:
    """run() under cProfile, its stats written to `path` (with this process's PID) when the loop ends."""
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    try:
        run()
    finally:
        profile.disable()
        profile.dump_stats(f"{path}.{os.getpid()}")


_preforked: Optional[tuple[ForkedChild, socket.socket]] = None


def prefork() -> bool:
    """Fork the rank process now, for the next MultiprocExecutor to adopt (module docstring). Only while this
    process has one thread (a fork copies no other thread, and a lock another thread holds stays held in the
    child). Returns whether a forked rank is waiting."""
    global _preforked
    if _preforked is not None or not sys.platform.startswith("linux"):
        return _preforked is not None
    # What every rank imports before its first step: the fork inherits it (the point of forking).
    from ..rank import worker  # noqa: F401
    from . import step_features  # noqa: F401
    import torch

    if torch.cuda.is_initialized():  # a CUDA context does not survive a fork: the rank is exec'd then
        return False
    parent = os.getpid()
    _preforked = fork_child(lambda fd: main(fd, parent), "rank process")
    return _preforked is not None


def take_prefork() -> Optional[tuple[ForkedChild, socket.socket]]:
    """The forked rank waiting for its `start`, once (None: none was forked, or it has exited)."""
    global _preforked
    taken, _preforked = _preforked, None
    if taken is not None and taken[0].poll() is not None:
        taken[1].close()
        return None
    return taken


def discard_prefork() -> None:
    """End a forked rank no executor adopted."""
    end_forked(take_prefork())


if __name__ == "__main__":
    # Through the package's module, not __main__: what it pickles (RankHello) must name a module the parent has.
    from moelink.engine.cluster.mp_rank import main as package_main

    package_main(int(sys.argv[1]), int(sys.argv[2]))
