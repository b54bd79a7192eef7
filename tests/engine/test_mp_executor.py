"""The multiprocess executor (engine/cluster/mp_executor.py, engine/cluster/mp_rank.py): one rank in a process of its
own gives the in-process rank's tokens and logprobs, in both answer orders (a CPU rank answers each step unasked; a
GPU rank waits for the collect: forced here with eager=False), passes a rank call's error back with its type and
the rank's traceback, and a rank process that dies or is stopped leaves nothing behind.

One engine per module is started for the parity and calls; the death test starts its own (it kills the rank).
"""
from __future__ import annotations

import os
import signal
import time

import pytest

from moelink.engine import LLM
from moelink.engine.cluster.executor import WorkerDiedError
from moelink.engine.cluster.mp_executor import MultiprocExecutor, RankTraceback
from moelink.engine.contract.sampling_params import SamplingParams
from moelink.engine.tools.builtin_model import BUILTIN_MODEL_DIR

MODEL = str(BUILTIN_MODEL_DIR)
PROMPTS = [[17, 300, 42, 5], [9, 8, 7, 6, 5, 4, 3], [1000], [2, 4, 8, 16, 32, 64, 128, 256, 512]]
PARAMS = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
ENGINE = dict(dtype="float32", max_model_len=128, num_kv_blocks=48, max_num_seqs=4)


def _run(llm) -> list[tuple]:
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [(tuple(o.outputs[0].token_ids), [sorted(d.items()) for d in o.outputs[0].logprobs]) for o in outs]


def _logprob_values(rows):
    return [[(k, v.logprob) for k, v in step] for step in rows]


@pytest.fixture(scope="module")
def reference():
    with LLM(MODEL, **ENGINE) as llm:
        return _run(llm)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("eager", [None, False], ids=["eager-cpu", "ordered-gpu-order"])
def test_mp_rank_gives_the_in_process_tokens_and_logprobs(reference, eager, monkeypatch):
    if eager is False:
        # The GPU order (a collect message per step) on a CPU rank: the executor is made with eager=False.
        import moelink.engine.cluster.executor_factory as factory

        def make(config, plan=None):
            return MultiprocExecutor(config, plan, eager=False)

        monkeypatch.setattr(factory, "make_executor", make)
        import moelink.engine.core.llm_engine as llm_engine

        monkeypatch.setattr(llm_engine, "make_executor", make)
    with LLM(MODEL, executor="mp", **ENGINE) as llm:
        executor = llm.engine.executor
        assert isinstance(executor, MultiprocExecutor) and executor.pid != os.getpid()
        assert executor._eager is (eager is None)
        got = _run(llm)
        pid = executor.pid
        # Errors of a rank call come back with their type, the rank's traceback as the cause; the rank goes on.
        with pytest.raises(ValueError, match="step_id=12345 is invalid") as info:
            executor._call_ranks("collect", 12345)
        assert isinstance(info.value.__cause__, RankTraceback) and "worker.py" in str(info.value.__cause__)
        assert _run(llm) == got
    assert [g[0] for g in got] == [r[0] for r in reference]
    for (_, lp), (_, ref_lp) in zip(got, reference):
        for step, ref_step in zip(_logprob_values(lp), _logprob_values(ref_lp)):
            assert [k for k, _ in step] == [k for k, _ in ref_step]
            assert [v for _, v in step] == pytest.approx([v for _, v in ref_step], rel=1e-5, abs=1e-5)
    assert _gone_within(pid, 10), "the rank process outlived its engine's shutdown"


def test_a_killed_rank_process_is_a_worker_died_error_and_shutdown_ends_it():
    llm = LLM(MODEL, executor="mp", **ENGINE)
    executor = llm.engine.executor
    pid = executor.pid
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match=r"the rank process died: its process exited \(status -9\)"):
        llm.generate(PROMPTS[:1], PARAMS, use_tqdm=False)
    assert isinstance(executor.dead_error, WorkerDiedError)
    with pytest.raises(WorkerDiedError):
        executor.check_health()
    llm.shutdown()
    llm.shutdown()  # idempotent
    assert not _alive(pid)


def test_mp_is_refused_beyond_one_rank():
    from moelink.engine.config.parallel import ParallelConfig

    with pytest.raises(ValueError, match="executor='mp' runs one rank"):
        ParallelConfig(expert_parallel_size=2, executor="mp")


PREFORK_SCRIPT = r"""
import os, sys
from moelink.engine.cluster import mp_rank
assert mp_rank.prefork(), "a single-threaded process forks its rank"
forked = mp_rank._preforked[0].pid
from moelink.engine import LLM
from moelink.engine.contract.sampling_params import SamplingParams
with LLM(sys.argv[1], executor="mp", dtype="float32", max_model_len=128, num_kv_blocks=48) as llm:
    assert llm.engine.executor.pid == forked, (llm.engine.executor.pid, forked)  # adopted, not exec'd
    out = llm.generate([[17, 300, 42, 5]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    print("tokens", list(out[0].outputs[0].token_ids))
# One no executor adopts is ended by discard_prefork.
assert mp_rank.prefork()
spare = mp_rank._preforked[0]
mp_rank.discard_prefork()
assert spare.poll() is not None and mp_rank._preforked is None
print("forked", forked)
"""


def test_a_forked_rank_is_adopted_and_an_unadopted_one_ended(reference):
    from tests.helpers import zygote

    done = zygote.run([zygote.real_python(), "-c", PREFORK_SCRIPT, MODEL], capture_output=True, text=True,
                      timeout=300, fork_code=True)
    assert done.returncode == 0, done.stderr[-3000:]
    tokens = [line for line in done.stdout.splitlines() if line.startswith("tokens ")]
    assert tokens == [f"tokens {list(reference[0][0][:4])}"]
    pid = int(done.stdout.split("forked ")[-1].split()[0])
    assert not _alive(pid)


# -- the conversation, without a model: the rank's loop (mp_rank.RankLoop) on a fake Worker over a socket pair -------
class _FakeWorker:
    """Steps answer `payload` bytes (a large ModelRunnerOutput's stand-in); `lambda_result` answers a value that
    does not pickle."""

    def __init__(self, payload: int):
        self.payload, self.runner = payload, None
        self._launched: dict[int, bytes] = {}

    def launch(self, so, run_forward):
        self._launched[so.step_id] = b"x" * self.payload

    def collect(self, step_id):
        return self._launched.pop(step_id)

    def lambda_result(self):
        return lambda: None

    def echo(self, value):
        return value

    def close_runner(self):
        pass


def _rank_loop(worker, eager=True):
    import socket
    import threading
    from multiprocessing.connection import Connection

    from moelink.engine.cluster.mp_rank import Answers, RankLoop

    a, b = socket.socketpair()
    parent, child = Connection(a.detach()), Connection(b.detach())
    loop = RankLoop(child, worker, eager, Answers(child))
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    return parent, thread


def test_an_eager_rank_reads_the_next_launch_while_a_large_answer_waits():
    """Both a step's answer and the next launch larger than the socket's buffers: with the answers written by the
    loop itself both sides blocked in a send (found in review); the writer thread keeps the loop reading."""
    import pickle
    import threading
    from types import SimpleNamespace

    parent, thread = _rank_loop(_FakeWorker(payload=4 << 20))
    big = b"p" * (4 << 20)  # a long prompt's launch
    sent = threading.Event()

    def send_two():
        for step in (1, 2):
            parent.send_bytes(pickle.dumps(("launch", SimpleNamespace(step_id=step, big=big), True)))
        sent.set()

    threading.Thread(target=send_two, daemon=True).start()
    assert sent.wait(60), "the parent's second launch never went through: the rank stopped reading"
    answers = [pickle.loads(parent.recv_bytes()) for _ in range(2)]
    assert [(status, len(value)) for status, value in answers] == [("ok", 4 << 20)] * 2
    parent.send_bytes(pickle.dumps(("stop",)))
    assert pickle.loads(parent.recv_bytes()) == ("ok", None)
    thread.join(10)
    assert not thread.is_alive()


def test_an_answer_that_does_not_pickle_is_its_error_and_the_rank_goes_on():
    import pickle

    parent, thread = _rank_loop(_FakeWorker(payload=1))
    parent.send_bytes(pickle.dumps(("call", "lambda_result", ())))
    status, exc, _ = pickle.loads(parent.recv_bytes())
    assert status == "err" and "pickle" in str(exc).lower()
    parent.send_bytes(pickle.dumps(("call", "echo", (7,))))
    assert pickle.loads(parent.recv_bytes()) == ("ok", 7)
    parent.close()  # the parent gone: the loop ends on EOF
    thread.join(10)
    assert not thread.is_alive()


def test_the_first_model_step_keeps_its_longer_bound_when_the_next_is_launched_first():
    """The overlapped loop launches step 2 before it collects step 1: the bound is fixed at launch (found in
    review: it was read at collect, and step 1 lost FIRST_STEP_TIMEOUT_S)."""
    import collections
    import threading
    from types import SimpleNamespace

    from moelink.engine.cluster.mp_executor import MpLaunchedStep
    from moelink.engine.config.timeouts import FIRST_STEP_TIMEOUT_S

    ex = MultiprocExecutor.__new__(MultiprocExecutor)
    ex.plan = SimpleNamespace(decode_capacity=None)
    ex._step_timeout_s, ex._model_steps, ex._lock, ex._eager = 120.0, 0, threading.Lock(), True
    ex._expected, ex._dead = collections.deque(), None
    ex._send = lambda msg: None
    steps = [ex.launch([SimpleNamespace(step_id=i, is_empty=empty)]) for i, empty in ((1, True), (2, False), (3, False))]
    assert all(isinstance(s, MpLaunchedStep) for s in steps)
    assert [s.timeout_s for s in steps] == [120.0, FIRST_STEP_TIMEOUT_S, 120.0]


def test_cached_request_data_pickles_every_field():
    import dataclasses
    import pickle

    from moelink.scheduler.outputs import CachedRequestData

    values = {f.name: i for i, f in enumerate(dataclasses.fields(CachedRequestData))}
    sample = CachedRequestData(**{k: [v] if k.endswith("ids") else (f"r{v}" if k == "req_id" else v)
                                  for k, v in values.items()})
    back = pickle.loads(pickle.dumps(sample))
    assert [getattr(back, k) for k in values] == [getattr(sample, k) for k in values]
