"""What the elastic-EP Ray tests share (tests/ep/test_ep_elastic.py): the engine settings, the prompts, the
one-rank reference run, a bounded step loop and a SIGKILL by PID."""
from __future__ import annotations

import contextlib
import os
import signal
import time

from moelink.engine import EngineArgs, SamplingParams

# Enough that every request is still in flight at each test's kills (at most ~5 tokens out by then); each token
# more is one step more of every EP engine here.
MAX_TOKENS = 10
# Rejoin off except where a test turns it on: a replacement would return these engines to EP N mid-assertion.
KW = dict(dtype="float64", max_model_len=256, num_kv_blocks=64, max_num_seqs=16, heartbeat_timeout=10.0,
          ep_rejoin=False)
PROMPTS = [[(7 * i + j) % 50 + 3 for j in range(5 + i % 4)] for i in range(24)]
LATE_PROMPTS = [[(11 * i + j) % 40 + 5 for j in range(6)] for i in range(8)]  # sent after the kill
STREAM = [[(5 * i + j) % 45 + 4 for j in range(4 + i % 3)] for i in range(12)]  # the steady stream until rejoin
# Long prompts, prefilled in 32-token chunks at EP 3 (ids c0, c1, ...).
CHUNKED = [[(13 * i + j) % 60 + 2 for j in range(70 + 5 * i)] for i in range(6)]
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def engine(path: str, **kw):
    from moelink.engine.core.llm_engine import LLMEngine

    return LLMEngine(EngineArgs(model=path, **{**KW, **kw}).create_engine_config())


_REFERENCES: dict[str, dict[str, list[int]]] = {}


def reference(path: str) -> dict[str, list[int]]:
    """The one-rank outputs of PROMPTS + LATE_PROMPTS (r0, r1, ...), STREAM (s0, ...) and CHUNKED (c0, ...), in
    one run: computed once per checkpoint and session (the same deterministic float64 greedy run each test
    would repeat; greedy float64 outputs depend neither on the batch around a request nor on how its prompt
    is chunked); callers only read it."""
    if path not in _REFERENCES:
        _REFERENCES[path] = _reference(path)
    return dict(_REFERENCES[path])


def _reference(path: str) -> dict[str, list[int]]:
    eng = engine(path, expert_parallel_size=1)
    try:
        for i, p in enumerate(PROMPTS + LATE_PROMPTS):
            eng.add_request(f"r{i}", p, PARAMS)
        for i, p in enumerate(STREAM):
            eng.add_request(f"s{i}", p, PARAMS)
        for i, p in enumerate(CHUNKED):
            eng.add_request(f"c{i}", p, PARAMS)
        return drain(eng, {})
    finally:
        eng.shutdown()


def drain(eng, done: dict, on_step=None, timeout: float = 240.0) -> dict[str, list[int]]:
    deadline = time.monotonic() + timeout
    while eng.has_requests():
        assert time.monotonic() < deadline, f"requests did not finish in {timeout:g} s: {eng.stats()}"
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        if on_step is not None:
            on_step()
    return {rid: o.outputs[0].token_ids for rid, o in done.items()}


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def loss_fails_fast(eng, num_prompts: int, rank: int = 1, name: str | None = None):
    """With nothing to recover to, SIGKILL rank `rank` while `num_prompts` requests run: the engine's steps raise
    one WorkerDiedError naming the rank as `name` (default: an expert-parallel rank; executor.rank_name) (no
    recovery tried, so the error never mentions elastic EP); returns it."""
    import re

    import pytest

    from moelink.engine.cluster.executor import WorkerDiedError

    for i, p in enumerate(PROMPTS[:num_prompts]):
        eng.add_request(f"x{i}", p, PARAMS)
    eng.step()
    kill(eng.executor.rank_pids[rank])
    name = f"expert-parallel rank {rank}" if name is None else name
    with pytest.raises(WorkerDiedError, match=rf"^{re.escape(name)} died") as info:
        for _ in range(200):
            eng.step()
    assert "elastic" not in str(info.value)
    return info.value
