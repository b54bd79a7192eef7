"""EngineArgs.cpu_reserved_cores (`--cpu-reserved-cores`; vLLM's VLLM_CPU_NUM_OF_RESERVED_CPU): a CPU engine's
torch threads leave that many cores to the processes serving beside it (engine/rank/worker.py)."""
from __future__ import annotations

import os

import pytest
import torch

from moelink.engine import LLM, EngineArgs


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # process-wide: the next test in this worker gets what it had


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_bad_reserved_cores_are_refused_naming_the_field(tiny_model, bad):
    with pytest.raises(ValueError, match="cpu_reserved_cores"):
        EngineArgs(model=tiny_model("qwen3_e6k3"), cpu_reserved_cores=bad).create_engine_config()


def test_reserved_cores_leave_the_engine_the_rest(tiny_model, threads_restored, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32, cpu_reserved_cores=1)
    try:
        assert torch.get_num_threads() == max(1, len(os.sched_getaffinity(0)) - 1)
    finally:
        llm.shutdown()


def test_omp_num_threads_wins_over_reserved_cores(tiny_model, threads_restored, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    llm = LLM(tiny_model("qwen3_e6k3"), dtype="float32", num_kv_blocks=32, cpu_reserved_cores=5)
    try:
        assert torch.get_num_threads() == 2
    finally:
        llm.shutdown()
