"""Sleep and wake on a GPU with decode CUDA graphs (engine/rl/rank/sleep_mode.py; docs/rl.md): sleep(1) gives the
device back (torch's allocated bytes fall by at least the bytes the engine reports freed), wake_up brings the weights
back from host memory and the greedy tokens equal those before (graphs captured again where a storage moved, so no
graph reads freed memory); sleep(2), an update from disk and wake_up serve the new checkpoint as an engine started on
it does. The bytes freed and the time to wake are printed (`make test-gpu -- -s`)."""
from __future__ import annotations

import os

import pytest
import torch

from moelink.engine import LLM

from tests.helpers.parity import engine_greedy, prompts
from tests.helpers.tiny_configs import TINY_CONFIGS

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

KW = dict(dtype="float32", device="cuda", num_kv_blocks=256, block_size=16, enable_weight_updates=True,
          cuda_graph_sizes=[1, 2, 4])


def test_sleep_and_wake_with_cuda_graphs(tiny_model, tmp_path):
    from moelink.engine.tools.tiny_model import make_tiny_model

    a = tiny_model("qwen3_e6k3")
    b = str(make_tiny_model(tmp_path / "b", **{**TINY_CONFIGS["qwen3_e6k3"], "seed": 1}))
    ps = prompts(TINY_CONFIGS["qwen3_e6k3"]["vocab_size"], seed=47, n=4, lo=2, hi=30)
    want_b = engine_greedy(LLM(b, **KW), ps)
    llm = LLM(a, **KW)
    assert llm.engine.executor.runner.graphs is not None, "the test needs captured decode graphs"
    before = engine_greedy(llm, ps)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated()
    info = llm.sleep(1)
    freed = held - torch.cuda.memory_allocated()
    assert freed >= info["bytes_freed"] > 0
    woke = llm.wake_up()
    print(f"sleep(1): {info['bytes_freed']} bytes freed in {info['seconds'] * 1e3:.1f} ms; wake_up "
          f"{woke['seconds'] * 1e3:.1f} ms, graphs captured again: {woke['graphs_recaptured']}")
    assert engine_greedy(llm, ps) == before
    llm.sleep(2)
    llm.update_weights_from_disk(b)
    llm.wake_up()
    assert engine_greedy(llm, ps) == want_b
