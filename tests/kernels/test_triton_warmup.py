"""Start-up warm-up on the Triton kernels (engine/rank/warmup.py's full plan), in the CPU interpreter at a tiny
shape: every phase runs (the MoE variants as direct expert calls, prefill, decode, mixed steps, the sampler),
and the engine starts with its KV cache all zeros, its expert counters zero and no request state."""
from __future__ import annotations

import logging

import pytest
import torch

from moelink.engine import LLM


@pytest.mark.slow  # the interpreter: ~6 s for the nine warm-up passes of a one-layer model
def test_warm_up_runs_every_phase_on_the_triton_kernels(tiny_model, kdev, caplog):
    if kdev.type != "cpu":
        pytest.skip("CPU interpreter smoke; on a GPU the engine tests start engines on Triton, warm-up included")
    path = tiny_model("qwen3_e6k3", num_layers=1)
    with caplog.at_level(logging.INFO, logger="moelink.engine.rank.warmup"):
        llm = LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=2, max_num_batched_tokens=4,
                  max_model_len=32, num_kv_blocks=16, block_size=16)
    with llm:
        runner = llm.engine.executor.runner
        assert runner.kernels.name == "triton"
        phases = {r.getMessage().split(":")[0] for r in caplog.records if r.getMessage().startswith("warm-up ")}
        assert phases == {f"warm-up {p}" for p in ("moe", "prefill", "decode", "mixed", "sampler")}
        assert all(not t.view(torch.uint8).any() for layer in runner.kv_caches for t in layer)
        assert not runner.model.moe_stats.counts_LG.any() and not runner.requests

