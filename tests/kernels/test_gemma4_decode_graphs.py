"""Decode graphs (the CPU stand-in of the capture, Triton in the interpreter) of Gemma 4's layers: the sliding and full
GQA layers of two widths (the v norm outside the fused decode input, k_proj read as the values), the router's
per-expert scale and the reference experts inside a padded static batch, and the softcapped logits: the tokens equal
the eager engine's."""
from __future__ import annotations

import pytest


@pytest.mark.slow
def test_decode_graphs_match_eager(kdev, tmp_path):
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, test_gpu_engine.py captures real graphs")
    from moelink.engine import LLM, SamplingParams
    from moelink.engine.models.gemma4.tiny import GEMMA4, save_gemma4

    from tests.helpers.graph_replays import Replay, count_replays

    path = save_gemma4(tmp_path, GEMMA4)
    prompts = [[(7 * i + 3 * n) % 397 + 2 for i in range(n)] for n in (5, 9, 14)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (5, 3, 4)]

    def llm():
        return LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=4, max_num_batched_tokens=64,
                   num_kv_blocks=32, block_size=8, enable_prefix_caching=False, skip_warmup=True)

    want = [o.outputs[0].token_ids for o in llm().generate(prompts, params, use_tqdm=False)]
    graphed = llm()
    runner = graphed.engine.executor.worker.runner
    runner.graph_sizes, runner.graph_backend = (1, 2, 4), Replay()
    runner._capture_graphs()
    assert runner.graphs is not None and set(runner.graphs.steps) == {1, 2, 4}
    replays = count_replays(runner.graphs)
    got = [o.outputs[0].token_ids for o in graphed.generate(prompts, params, use_tqdm=False)]
    assert sum(replays.values()) > 0, f"no step replayed a graph: {replays}"
    assert got == want
