"""The step streams (engine/rank/device_stream.py): on a CUDA device every strategy's `wait()` waits for the GPU.

The serial loop's InlineStream used to return its value with no event on CUDA: the host then read the sampled
tokens from pinned memory before the GPU's copy landed (garbage token ids, an out-of-range embedding gather at
batch 256 on an H200, 2026-11-25). CUDA's events are stood in for here, so this runs without a GPU."""
from __future__ import annotations

import pytest
import torch

from moelink.engine.rank import device_stream
from moelink.engine.rank.device_stream import InlineStream, make_stream


class FakeEvent:
    log: list[str] = []

    def record(self):
        FakeEvent.log.append("record")

    def synchronize(self):
        FakeEvent.log.append("synchronize")


@pytest.fixture
def fake_cuda_events(monkeypatch):
    FakeEvent.log = []
    monkeypatch.setattr(device_stream.torch.cuda, "Event", FakeEvent)
    return FakeEvent.log


def test_on_cuda_wait_synchronizes_on_an_event_recorded_after_the_work(fake_cuda_events):
    stream = make_stream(torch.device("cuda"))
    order = []
    work = stream.submit(lambda: order.append("enqueued") or 7)
    assert order == ["enqueued"] and fake_cuda_events == ["record"], "the event is recorded after the work"
    assert work.wait() == 7
    assert fake_cuda_events == ["record", "synchronize"], f"{stream.name}: wait() must wait for the GPU"


def test_on_the_cpu_the_stream_is_inline_and_records_no_event(fake_cuda_events):
    stream = make_stream(torch.device("cpu"))
    assert isinstance(stream, InlineStream)
    assert stream.submit(lambda: 3).wait() == 3
    assert fake_cuda_events == []
