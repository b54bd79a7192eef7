"""What the elastic-EP Ray tests share (tests/ep/test_ep_elastic.py): the engine settings, the prompts, the
one-rank reference run, a bounded step loop and a SIGKILL by PID."""
from __future__ import annotations

import contextlib
import os
import signal
import time

from moelink.engine import EngineArgs, SamplingParams

MAX_TOKENS = 20
# Rejoin off except where a test turns it on: a replacement would return these engines to EP N mid-assertion.
KW = dict(dtype="float64", max_model_len=256, num_kv_blocks=64, max_num_seqs=16, heartbeat_timeout=10.0,
          ep_rejoin=False)
PROMPTS = [[(7 * i + j) % 50 + 3 for j in range(5 + i % 4)] for i in range(24)]
LATE_PROMPTS = [[(11 * i + j) % 40 + 5 for j in range(6)] for i in range(8)]  # sent after the kill
STREAM = [[(5 * i + j) % 45 + 4 for j in range(4 + i % 3)] for i in range(12)]  # the steady stream until rejoin
PARAMS = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def engine(path: str, **kw):
    from moelink.engine.core.llm_engine import LLMEngine

    return LLMEngine(EngineArgs(model=path, **{**KW, **kw}).create_engine_config())


_REFERENCES: dict[tuple[str, bool], dict[str, list[int]]] = {}


def reference(path: str, stream: bool = False) -> dict[str, list[int]]:
    """The one-rank outputs of PROMPTS + LATE_PROMPTS (+ STREAM): computed once per checkpoint and session (the
    same deterministic float64 greedy run each test would repeat); callers only read it."""
    if (path, stream) not in _REFERENCES:
        _REFERENCES[path, stream] = _reference(path, stream)
    return dict(_REFERENCES[path, stream])


def _reference(path: str, stream: bool) -> dict[str, list[int]]:
    eng = engine(path, expert_parallel_size=1)
    try:
        for i, p in enumerate(PROMPTS + LATE_PROMPTS):
            eng.add_request(f"r{i}", p, PARAMS)
        for i, p in enumerate(STREAM if stream else []):
            eng.add_request(f"s{i}", p, PARAMS)
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
