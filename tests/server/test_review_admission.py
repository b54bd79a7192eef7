"""Review: admission limits must never refuse forever a request that fits an empty queue."""
from __future__ import annotations

import pytest

from moelink.engine.server.registry import Overloaded, RequestRegistry


def test_request_larger_than_token_limit_is_admitted_into_an_empty_queue():
    # RESOURCE_EXHAUSTED says "retry later"; with nothing queued a retry can never succeed,
    # so a lone request over --max-queued-tokens is admitted (the limit bounds the backlog).
    reg = RequestRegistry(max_queued_requests=4, max_queued_tokens=300)
    entry = reg.admit("big", ["big|0"], 400)
    assert reg.queued_tokens == 400
    with pytest.raises(Overloaded):  # but nothing more while it waits
        reg.admit("small", ["small|1"], 10)
    reg.release(entry)
    assert reg.queued_tokens == 0 and reg.queued_requests == 0 and not reg.active
