"""engine/cluster/rejoin.py without Ray: the replacements' state machine, the backoff, the flags; and Worker.preload
(the replacement's share loaded before it has a process group) on one process, gloo with one peer."""
from __future__ import annotations

import pytest

from moelink.engine.config.parallel import ParallelConfig
from moelink.engine.cluster.rejoin import Backoff, Phase, RejoinTracker


def test_backoff_doubles_up_to_its_cap_and_is_validated():
    b = Backoff(first_s=1.0, factor=2.0, max_s=5.0, max_attempts=4)
    assert [b.delay(n) for n in (1, 2, 3, 4, 5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    with pytest.raises(ValueError, match="max_attempts=0 is invalid"):
        Backoff(max_attempts=0)
    with pytest.raises(ValueError, match="factor >= 1"):
        Backoff(factor=0.5)


def test_tracker_waits_the_delay_then_starts_then_is_ready_and_taken_once():
    t = RejoinTracker(delay_s=3.0, backoff=Backoff(first_s=1.0, max_attempts=3))
    assert t.phase is Phase.IDLE and t.take() == {}
    t.lost([2], now=10.0)
    assert t.phase is Phase.WAITING and t.due(12.9) == [] and t.next_time() == 13.0
    assert t.due(13.0) == [2] and t.phase is Phase.STARTING
    assert t.due(14.0) == []  # started once, not twice
    t.lost([0], now=14.0)  # a second loss while the first replacement starts: admission waits for both
    t.succeeded(2, "actor-2")
    assert t.phase is Phase.WAITING and t.take() == {}
    assert t.due(17.0) == [0]
    t.succeeded(0, "actor-0")
    assert t.phase is Phase.READY
    assert t.take() == {0: "actor-0", 2: "actor-2"}
    assert t.phase is Phase.IDLE and t.take() == {}


def test_tracker_retries_with_backoff_then_gives_up_until_the_next_loss():
    t = RejoinTracker(delay_s=0.0, backoff=Backoff(first_s=1.0, factor=2.0, max_s=60.0, max_attempts=3))
    t.lost([1], now=0.0)
    assert t.due(0.0) == [1]
    assert t.failed(1, now=5.0) and t.phase is Phase.WAITING and t.next_time() == 6.0
    assert t.due(5.5) == [] and t.due(6.0) == [1]
    assert t.failed(1, now=7.0) and t.next_time() == 9.0
    assert t.due(9.0) == [1]
    t.succeeded(1, "a")
    assert t.phase is Phase.READY
    assert t.failed(1, now=10.0) is False  # a ready replacement died: its third failure
    assert t.phase is Phase.GAVE_UP and t.due(1e9) == [] and t.take() == {}
    t.lost([1], now=20.0)  # a new loss frees it again: a fresh set of attempts
    assert t.phase is Phase.WAITING and t.failures[1] == 0 and t.due(20.0) == [1]


def test_rejoin_flags_are_validated_and_reach_the_config(tiny_model):
    from moelink.engine import EngineArgs
    from moelink.engine.api.cli import build_parser
    from moelink.engine.api.cli_args import engine_args_from

    assert ParallelConfig().rejoin_enabled and not ParallelConfig(elastic_ep=False).rejoin_enabled
    assert not ParallelConfig(ep_rejoin=False).rejoin_enabled
    with pytest.raises(ValueError, match=r"ep_rejoin='on' is invalid: must be True, False or None"):
        ParallelConfig(ep_rejoin="on")
    with pytest.raises(ValueError, match=r"ep_rejoin=True needs elastic_ep=True"):
        ParallelConfig(ep_rejoin=True, elastic_ep=False)
    for bad in (-1.0, float("nan"), "3", True):
        with pytest.raises(ValueError, match=r"ep_rejoin_delay_s=.* is invalid: must be a finite number of seconds"):
            ParallelConfig(ep_rejoin_delay_s=bad)
    with pytest.raises(ValueError, match=r"ep_rejoin=True needs elastic_ep=True"):
        EngineArgs(model="m", ep_rejoin=True, elastic_ep=False)
    path = tiny_model("qwen3_e6k3")
    par = EngineArgs(model=path, num_kv_blocks=8, ep_rejoin_delay_s=0.0).create_engine_config().parallel
    assert par.rejoin_enabled and par.ep_rejoin_delay_s == 0.0
    parse = build_parser().parse_args
    ns = parse(["generate", path, "--prompt", "hi", "--no-ep-rejoin", "--ep-rejoin-delay-s", "7.5"])
    args = engine_args_from(ns)
    assert args.ep_rejoin is False and args.ep_rejoin_delay_s == 7.5
    assert not args.create_engine_config().parallel.rejoin_enabled
    assert engine_args_from(parse(["generate", path, "--prompt", "hi"])).ep_rejoin is None


def test_rejoiner_thread_retries_a_failing_start_with_backoff_then_gives_up():
    """The background thread: a replacement whose start fails is retried after the backoff, never raising
    into anyone; after max_attempts it gives up (no Ray needed: the start itself fails)."""
    import threading
    import time
    from types import SimpleNamespace

    pytest.importorskip("ray")
    from moelink.engine.cluster.rejoin import Rejoiner

    calls: list[float] = []

    def start(bundle):
        calls.append(time.monotonic())
        raise RuntimeError(f"bundle {bundle} cannot be placed")

    state = SimpleNamespace(stopping=threading.Event(), dead_error=None, spares=[])
    rj = Rejoiner(start, state, delay_s=0.0, backoff=Backoff(first_s=0.05, factor=2.0, max_s=1.0, max_attempts=3))
    try:
        rj.lost([1])
        deadline = time.monotonic() + 10
        while rj.phase is not Phase.GAVE_UP:
            assert time.monotonic() < deadline, rj.phase
            time.sleep(0.01)
        assert len(calls) == 3 and rj.start_failures == 3 and not rj.ready and rj.take() == {}
        assert calls[1] - calls[0] >= 0.05 and calls[2] - calls[1] >= 0.1  # the backoff doubled
        assert state.spares == []
    finally:
        state.stopping.set()
