"""The driver's calls on every rank (engine/contract/worker_api.py): each RankCall is a Worker method with RankAPI's
signature, and nothing else is called that way."""
from __future__ import annotations

import inspect

import pytest

from moelink.engine.cluster.executor import InProcessExecutor
from moelink.engine.rank.worker import Worker
from moelink.engine.contract.worker_api import RankAPI, RankCall, rank_call


@pytest.mark.parametrize("call", list(RankCall), ids=lambda c: c.value)
def test_the_worker_implements_each_call_with_its_signature(call):
    declared = inspect.signature(getattr(RankAPI, call.value))
    implemented = inspect.signature(getattr(Worker, call.value))
    # `ray.remote(Worker)` (a Ray test earlier in this process) adds Ray's own `_ray_trace_ctx` keyword to the
    # class's methods in place: Ray's, not the worker API's.
    params = [p for p in implemented.parameters if p != "_ray_trace_ctx"]
    assert params == list(declared.parameters), call
    assert call == call.value  # a str enum: a stand-in executor may compare it with the name


def test_protocol_and_enum_name_the_same_calls():
    declared = {n for n, v in vars(RankAPI).items() if callable(v) and not n.startswith("_")}
    assert declared == {c.value for c in RankCall}


def test_an_unknown_call_is_refused_naming_what_is_allowed():
    assert rank_call("eplb_move") is RankCall.EPLB_MOVE
    with pytest.raises(ValueError, match=r"collective method='shutdown' is invalid: it must be a RankCall "
                                         r"\(available_kv_blocks, allocate_kv_cache, .*eplb_test_slow_moves\)"):
        rank_call("shutdown")
    ex = object.__new__(InProcessExecutor)  # the check comes before any rank is called
    with pytest.raises(ValueError, match="collective method='load' is invalid"):
        ex.collective("load")
