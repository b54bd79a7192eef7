"""Decode graphs (the CPU stand-in of the capture, Triton in the interpreter) of LFM2-MoE's short-conv layers and of
Cohere2-MoE's parallel layers: the graphs' padded static batch reads and writes the conv states by the slots on the
device (padding rows on the null slot), and the tokens equal the eager engine's."""
from __future__ import annotations

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("family", ["lfm2_moe", "cohere2_moe"])
def test_decode_graphs_match_eager(kdev, tmp_path, family):
    if kdev.type != "cpu":
        pytest.skip("CPU stand-in for the capture; with a GPU, test_gpu_engine.py captures real graphs")
    from moelink.engine import LLM, SamplingParams
    from moelink.engine.models.cohere2_moe.tiny import COHERE2_MOE
    from moelink.engine.models.lfm2_moe.tiny import LFM2_MOE
    from moelink.engine.tools.tiny_families import save_drawn_preset

    from tests.helpers.graph_replays import Replay, count_replays

    preset = {"lfm2_moe": LFM2_MOE, "cohere2_moe": COHERE2_MOE}[family]
    path = save_drawn_preset(tmp_path, preset, num_hidden_layers=3,
                             **({"layer_types": ["conv", "full_attention", "conv"]} if family == "lfm2_moe" else
                                {"layer_types": ["full_attention", "sliding_attention", "full_attention"],
                                 "mlp_layer_types": ["dense", "sparse", "sparse"]}))
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
