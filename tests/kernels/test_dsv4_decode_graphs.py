"""DeepSeek-V4's decode graphs (engine/rank/cuda_graph.py with `Replay` on CPU, the Triton kernels in the
interpreter): its decode attention reads device lengths only (engine/models/deepseek_v4/decode.py), each row's state slot
is a static graph input (padding rows -1: they read the null slot and write no state, no entry), and a decode
replayed from graphs equals the eager engine token for token while prompts cross compression boundaries and the
indexer's top-k; every block comes back."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams

from tests.helpers.dsv4_checkpoint import save_dsv4_checkpoint
from tests.helpers.graph_replays import Replay, count_replays


def _llm(path):
    return LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=3, max_num_batched_tokens=32,
               num_kv_blocks=24, block_size=8, enable_prefix_caching=False, skip_warmup=True, max_model_len=64)


def _generate(llm, prompts):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (6, 5)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params[: len(prompts)], use_tqdm=False)]


@pytest.mark.slow  # Triton in the interpreter, eager and replayed
def test_graph_decode_of_v4_matches_eager(tmp_path_factory, kdev):
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, real graphs are captured by the engine itself")
    path = save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4"))
    prompts = [[5, 9, 13, 7, 22, 31, 4, 8, 19, 2, 11, 60, 3], [3, 3, 40]]  # 13 and 3 tokens; decodes cross 16 / 8
    want = _generate(_llm(path), prompts)
    llm = _llm(path)
    runner = llm.engine.executor.worker.runner
    runner.graph_sizes, runner.graph_backend = (1, 2), Replay()  # one forward per size: the warm-up's
    runner._capture_graphs()
    assert runner.graphs is not None and runner.graphs.state_slots and set(runner.graphs.steps) == {1, 2}
    replays = count_replays(runner.graphs)
    got = _generate(llm, prompts)
    assert sum(replays.values()) >= 5, f"too few steps replayed a graph: {replays}"
    assert got == want
    # Padding rows wrote nothing: every layer's null state slot and null block (the last rows) are still zeros.
    for caches in runner.kv_caches:
        assert all(not t[-1].any() for t in caches)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
