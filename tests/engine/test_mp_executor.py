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
