"""Decode graphs (engine/rank/cuda_graph.py, `Replay` on CPU) of a hybrid model (Qwen3-Next: gated DeltaNet
beside gated full attention): each row's state slot is a static graph input, copied in per replay and padded with
-1 (padding rows read zeros and write no state); a decode replayed from graphs equals the eager engine on the same
Triton kernels, and every state slot and block comes back."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams

from tests.helpers.graph_replays import Replay, count_replays


def _llm(path):
    return LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=3, max_num_batched_tokens=32,
               num_kv_blocks=40, block_size=4, enable_prefix_caching=False, skip_warmup=True)


def _generate(llm, prompts):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (4, 3)]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params[: len(prompts)], use_tqdm=False)]


@pytest.mark.slow  # Triton in the interpreter, eager and replayed
def test_graph_decode_of_a_hybrid_model_matches_eager(hf_tiny_model, kdev):
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, real graphs are captured by the engine itself")
    path = hf_tiny_model("qwen3_next")
    prompts = [[5, 9, 13, 7, 22, 31, 4], [3, 3, 40]]
    want = _generate(_llm(path), prompts)
    llm = _llm(path)
    runner = llm.engine.executor.worker.runner
    runner.graph_sizes, runner.graph_backend = (1, 2), Replay()  # one forward per size: the warm-up's
    runner._capture_graphs()
    assert runner.graphs is not None and runner.graphs.state_slots and set(runner.graphs.steps) == {1, 2}
    replays = count_replays(runner.graphs)
    got = _generate(llm, prompts)
    assert sum(replays.values()) > 0, f"no step replayed a graph: {replays}"
    assert got == want
    null = runner.state_caches.null_slot
    assert all(not t[null].any() for pair in runner.state_caches.layers if pair is not None for t in pair)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
