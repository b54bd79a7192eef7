"""The multiprocess executor ("mp"): the engine's one rank in a process of its own (engine/cluster/mp_rank.py).

Why: in one process the front (HTTP, gRPC, streaming), the output thread (detokenizing) and the step (the forward's
host side, the sampler) share one interpreter lock, so a served engine runs on about one core whatever the machine
has: on the 2-core CPU proxy the served 8-stream step took 4.2-6.0 ms against 2.2 ms offline (issue 78). With the
rank in its own process the forward runs beside the driver's scheduling and output processing instead of taking
turns with them; vLLM's engine-core process buys the same. It carries to the GPU: a Blackwell rank's step of a few
ms leaves no room for a driver that waits on the front's lock.

What crosses the socket per step: the SchedulerOutput (pickled; new requests' token ids once, then only the
running requests' scheduled counts) and the ModelRunnerOutput back. Everything else is the Worker's calls
(engine/contract/worker_api.py), as the Ray executor makes them. A rank process that exits is a WorkerDiedError
naming its exit status; a step that runs past `--step-timeout` kills it ("is stuck"), as Ray's ranks.
"""
from __future__ import annotations

import collections
import logging
import os
import pickle
import subprocess
import threading
import weakref
from dataclasses import dataclass
from multiprocessing.connection import Connection

from moelink.scheduler.outputs import ModelRunnerOutput, SchedulerOutput

from ..config.engine_args import EngineConfig
from ..config.timeouts import FIRST_STEP_TIMEOUT_S
from ..contract.expert_parallel import ExpertParallelPlan, plan_expert_parallel
from ..contract.child_process import ForkedChild, exec_child
from ..contract.worker_api import LaunchedStep
from .executor import Executor, WorkerDiedError
from .mp_rank import RankHello, take_prefork

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # a clean stop releases the runner; past this the rank is killed
STOP_LOCK_WAIT_S = 5.0  # shutdown waits this long for a step under way to end before it kills the rank
# A rank call (start and load, KV sizing, warm-up, RL weight updates, EPLB) that has not answered in this long is
# a hung rank: killed, as a step past --step-timeout is (the first model step's bound: it compiles kernels).
CALL_TIMEOUT_S = FIRST_STEP_TIMEOUT_S


@dataclass(frozen=True)
class MpLaunchedStep(LaunchedStep):
    """A step sent to the rank: its collect waits `timeout_s` at most (fixed at launch: the first model step's
    longer bound must not be lost when the next step is launched before it is collected)."""

    timeout_s: float | None = None


class _Rank:
    """The rank process and its socket: the one `moelink serve` forked (mp_rank.prefork), else one exec'd now;
    `release` (also the finalizer) kills what is left."""

    def __init__(self):
        forked = take_prefork()
        self.proc: ForkedChild | subprocess.Popen
        if forked is not None:
            self.proc, sock = forked
        else:
            parent_pid = os.getpid()
            self.proc, sock = exec_child("moelink.engine.cluster.mp_rank", lambda fd: [str(fd), str(parent_pid)])
        self.conn = Connection(sock.detach())

    def release(self) -> None:
        # The process first, the socket last: a thread still reading it (the engine thread inside a step that a
        # shutdown from another thread ended) sees EOF from the dead rank, not a descriptor closed under it.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        try:
            self.conn.close()
        except OSError:
            pass


class MultiprocExecutor(Executor):
    """One rank in its own process. `plan`: the engine's (built from config if None). `eager`: whether the rank
    answers each step as soon as it ran (mp_rank.py); None: a CPU rank does, a GPU rank waits for the collect."""

    def __init__(self, config: EngineConfig, plan: ExpertParallelPlan | None = None, eager: bool | None = None):
        if config.parallel.world_size != 1:
            raise ValueError(f"executor='mp' runs one rank; a world of {config.parallel.world_size} ranks needs "
                             "executor='ray' or 'auto'.")
        self.plan = plan if plan is not None else plan_expert_parallel(config)
        self._step_timeout_s = config.parallel.step_timeout_s
        self._model_steps = 0
        self._lock = threading.Lock()  # one conversation at a time (the engine thread; a control call's thread)
        # Answers come in the order they were asked for: what each one will be ("step", id) or ("call",).
        self._expected: collections.deque[tuple] = collections.deque()
        self._early: dict[tuple, tuple] = {}  # answers read while waiting for a later one (a step's before a call's)
        self._dead: Exception | None = None
        self._rank = _Rank()
        self._finalizer = weakref.finalize(self, self._rank.release)
        try:
            hello = self._request(("start", config.worker_config(), self.plan, eager), CALL_TIMEOUT_S,
                                  "its start (loading the model)")
        except BaseException:
            # Not a "stop": a rank that failed its start has exited, one still loading is killed.
            self._dead = self._dead or RuntimeError("the rank process did not start")
            self._finalizer()
            raise
        assert isinstance(hello, RankHello)
        self.pid, self._eager = hello.pid, hello.eager
        logger.info("MultiprocExecutor: rank process %d ready", self.pid)

    @property
    def dead_error(self) -> Exception | None:
        return self._dead

    # -- the conversation ------------------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        if self._dead is not None:
            raise self._dead
        try:
            self._rank.conn.send_bytes(pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL))
        except OSError as exc:
            raise self._died(f"its socket failed ({exc})")

    def _answer(self, tag: tuple, timeout: float | None, late: str = "its step"):
        """The answer asked for as `tag`: its value, or its error raised (the rank's traceback as its cause)."""
        while tag not in self._early:
            expected = self._expected.popleft()
            self._early[expected] = self._recv(timeout, late)
        reply = self._early.pop(tag)
        if reply[0] == "ok":
            return reply[1]
        _, exc, tb = reply
        raise exc from RankTraceback(tb)

    def _recv(self, timeout: float | None, late: str = "its step") -> tuple:
        conn = self._rank.conn
        try:
            if timeout is not None and not conn.poll(timeout):
                self._rank.proc.kill()
                raise self._died(f"{late} ran longer than {timeout:g} s"
                                 + (" (--step-timeout)" if late == "its step" else ""), "is stuck")
            return pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            code = self._rank.proc.wait()
            raise self._died(f"its process exited (status {code})")

    def _died(self, reason: str, what: str = "died") -> Exception:
        """The error the rank's loss is (the first one stays: a later EOF does not hide "is stuck")."""
        if self._dead is None:
            self._dead = WorkerDiedError(0, f"{reason}, pid {self._rank.proc.pid}", what, name="the rank process")
        return self._dead

    # -- Executor ----------------------------------------------------------------------------------------------------
    def _request(self, msg: tuple, timeout: float, late: str):
        """Send a message the rank answers in turn (a call, the stop) and wait for its answer (the caller holds the
        lock); answers of steps still out are read first and kept."""
        self._send(msg)
        self._expected.append(("call",))
        return self._answer(("call",), timeout=timeout, late=late)

    def _call_ranks(self, name: str, *args) -> list:
        with self._lock:
            return [self._request(("call", name, args), CALL_TIMEOUT_S, f"its call {name}")]

    def warm_up(self, cfg) -> list:
        """As Executor.warm_up, bounded like a first step (compiles with a cold cache take minutes)."""
        with self._lock:
            timeout = max(self._step_timeout_s, FIRST_STEP_TIMEOUT_S)
            return [self._request(("call", "warm_up", (cfg,)), timeout, "its warm-up")]

    def execute(self, outputs_per_rank: list[SchedulerOutput]) -> list[ModelRunnerOutput]:
        return self.collect(self.launch(outputs_per_rank))

    def launch(self, outputs_per_rank: list[SchedulerOutput]) -> LaunchedStep:
        (so,) = outputs_per_rank
        self.plan_ep_step(outputs_per_rank)
        run_forward = not so.is_empty  # an empty step (finished ids only) runs no model code
        first = run_forward and self._model_steps == 0  # compiles kernels: the first step's longer bound
        timeout = max(self._step_timeout_s, FIRST_STEP_TIMEOUT_S) if first else self._step_timeout_s
        with self._lock:
            self._send(("launch", so, run_forward))
            if self._eager:  # a CPU rank answers the step unasked (mp_rank.py)
                self._expected.append(("step", so.step_id))
        self._model_steps += run_forward
        return MpLaunchedStep((so.step_id,), timeout_s=timeout)

    def collect(self, launched: LaunchedStep) -> list[ModelRunnerOutput]:
        if not isinstance(launched, MpLaunchedStep):
            raise TypeError(f"MultiprocExecutor.collect: {launched!r} was not launched by a MultiprocExecutor.")
        (step_id,) = launched.step_ids
        timeout = launched.timeout_s
        with self._lock:
            if not self._eager:
                self._send(("collect", step_id))
                self._expected.append(("step", step_id))
            return [self._answer(("step", step_id), timeout=timeout)]

    def check_health(self) -> None:
        if self._dead is None and self._rank.proc.poll() is not None:
            self._died(f"its process exited (status {self._rank.proc.returncode})")
        super().check_health()

    def shutdown(self) -> None:
        """Stop the rank (its runner's stream, plug-ins and memory released), then end its process. Idempotent.

        From any thread: when the engine thread is inside a step that does not end (a hung rank, the step watchdog's
        case), the rank is killed, which ends that step with a WorkerDiedError."""
        if not self._finalizer.alive:
            return
        alive = self._dead is None and self._rank.proc.poll() is None
        if alive and self._lock.acquire(timeout=STOP_LOCK_WAIT_S):
            try:
                self._request(("stop",), STOP_TIMEOUT_S, "its stop")  # steps still out are read and dropped
                self._rank.proc.wait(timeout=STOP_TIMEOUT_S)
            except Exception as exc:  # a stuck or broken rank is killed below
                logger.warning("MultiprocExecutor: rank process %d did not stop cleanly (%s); killing it",
                               self._rank.proc.pid, exc)
            finally:
                self._lock.release()
        self._dead = self._dead or RuntimeError("the engine's executor is shut down")
        self._finalizer()


class RankTraceback(Exception):
    """The rank process's traceback of an error it answered with (the `__cause__` of the error re-raised here)."""

    def __str__(self) -> str:
        return "\n" + self.args[0] if self.args and self.args[0] else ""


__all__ = ["MpLaunchedStep", "MultiprocExecutor", "RankTraceback"]
