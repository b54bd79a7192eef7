"""Fixtures the engine tests share."""
from __future__ import annotations

import threading

import pytest


@pytest.fixture
def gated_load(monkeypatch):
    """The KV offload tiers' loads (engine/kv_transfer/offload_store.TierStore.load) wait on the loader thread for
    `gate`; `landed` is set once one has written its blocks. Returns (gate, landed)."""
    from moelink.engine.kv_transfer.offload_store import TierStore

    gate, landed = threading.Event(), threading.Event()
    real = TierStore.load

    def load(self, *a):
        assert gate.wait(60)
        real(self, *a)
        landed.set()

    monkeypatch.setattr(TierStore, "load", load)
    return gate, landed
