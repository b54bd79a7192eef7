"""The step watchdog and its flags: a hung step kills the engine within --step-timeout, even with one rank."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from moelink.engine import AsyncEngine, EngineArgs, SamplingParams
from moelink.engine.api.async_engine import EngineDeadError

_ARGS = dict(dtype="float32", max_num_seqs=4, num_kv_blocks=64, max_model_len=256)


def test_step_timeout_flags_reach_the_parallel_config(tiny_model):
    from moelink.engine.api.cli import build_parser, engine_args_from
    from moelink.engine.config.timeouts import DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_STEP_TIMEOUT_S

    ns = build_parser().parse_args(["serve", tiny_model("qwen3_e6k3"), "--step-timeout", "7.5",
                                    "--heartbeat-timeout", "3"])
    par = engine_args_from(ns).parallel_config()
    assert (par.step_timeout_s, par.heartbeat_timeout_s) == (7.5, 3.0)
    default = EngineArgs(model="m").parallel_config()
    assert (default.step_timeout_s, default.heartbeat_timeout_s) == (DEFAULT_STEP_TIMEOUT_S, DEFAULT_HEARTBEAT_TIMEOUT_S)
    for field, value in (("step_timeout", 0), ("step_timeout", float("inf")), ("heartbeat_timeout", -1.0),
                         ("heartbeat_timeout", "10")):
        with pytest.raises(ValueError, match=field):
            EngineArgs(model="m", **{field: value})


@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_hung_step_fails_the_engine_within_the_step_timeout(tiny_model):
    engine = AsyncEngine.from_engine_args(EngineArgs(model=tiny_model("qwen3_e6k3"), step_timeout=1.0, **_ARGS))
    real_step, hang, release = engine.engine.step, threading.Event(), threading.Event()

    def step():
        if hang.is_set():
            release.wait(30)  # a step that does not end (a hung kernel, a lost peer)
        return real_step()

    engine.engine.step = step

    async def main():
        n = 0
        try:
            async for _ in engine.generate("a", [1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True)):
                n += 1
                if n == 3:
                    hang.set()
                    t0 = time.monotonic()
        except EngineDeadError as exc:
            return exc, time.monotonic() - t0
        raise AssertionError("the request finished although its engine hung")

    try:
        exc, elapsed = asyncio.run(asyncio.wait_for(main(), 20))
        # Budget 1 s, plus half of it as margin, plus one 0.25 s poll of the watchdog.
        assert 1.0 <= elapsed < 1.0 + 0.5 + 1.0, elapsed
        assert "--step-timeout" in str(exc) and "hung" in str(exc)
        assert not engine.is_healthy and "hung" in str(engine.dead_error)
        # When the step finally returns, the engine frees what it held and stops.
        release.set()
        engine._thread.join(10)
        assert not engine._thread.is_alive()
        stats = engine.stats()
        assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks
    finally:
        release.set()
        engine.shutdown()
