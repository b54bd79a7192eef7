"""Decode graphs (engine/rank/cuda_graph.py, `Replay` on CPU) when gpt-oss's sliding layers have their own block
table: the second static table and slot buffer are copied in, re-padded and read by the sliding layers, and a
decode that runs past the window (sliding entries turning null between replays) equals the eager engine on the
same Triton kernels. A 2-layer checkpoint: layer 0 slides (window 6) and shares its cache tensors with layer 1.
"""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams

from tests.helpers.graph_replays import Replay, count_replays
from tests.helpers.gpt_oss_checkpoints import save_gpt_oss


def _llm(path):
    return LLM(path, dtype="float32", device="cpu", kernels="triton", max_num_seqs=3, max_num_batched_tokens=32,
               num_kv_blocks=40, block_size=4, enable_prefix_caching=False, skip_warmup=True)  # warm-up: test_triton_warmup.py


def _generate(llm, prompts):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (14, 6, 10)]
    outs = llm.generate(prompts, params[: len(prompts)], use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.slow  # Triton in the interpreter, eager and replayed (~60 s on 2 cores)
def test_graph_decode_with_a_sliding_table_matches_eager(tmp_path, kdev):
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, test_gpu_engine.py captures real graphs")
    path = save_gpt_oss(tmp_path, num_hidden_layers=2)
    prompts = [[5, 9, 13, 7, 22, 31, 4, 8, 19], [3, 3, 40], [11] * 13]
    want = _generate(_llm(path), prompts)
    llm = _llm(path)
    runner = llm.engine.executor.worker.runner
    assert runner.kv_pairs == ((1, 0),)
    runner.graph_sizes, runner.graph_backend = (1, 2), Replay()  # one forward per size: the warm-up's
    runner._capture_graphs()
    assert runner.graphs is not None and runner.graphs.sliding_table and set(runner.graphs.steps) == {1, 2}
    replays = count_replays(runner.graphs)
    got = _generate(llm, prompts)
    assert all(replays.values()), f"every captured size should have served a step: {replays}"
    for (tok_w, lps_w), (tok_g, lps_g) in zip(want, got):
        assert tok_g == tok_w
        for lw, lg in zip(lps_w, lps_g):
            assert max(abs(lw[t].logprob - lg[t].logprob) for t in lw) < 1e-4
    # Padding rows wrote no KV into either group: the shared null block is still zero.
    assert all(not t[-1].any() for t in runner.kv_caches[0])
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks
