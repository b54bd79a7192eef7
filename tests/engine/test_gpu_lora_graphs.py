"""LoRA adapters with real decode CUDA graphs on a GPU (engine/rank/cuda_graph.py `lora`; docs/lora.md#how-it-runs): a
batch mixing two adapters and the base replays padded graphs (each token's slot a static input written before the
replay, the Triton shrink / expand captured) and gives every request the eager engine's tokens and logprobs; an
adapter loaded into a slot after the capture is what the next replays read; an adapter on the routed experts'
gate_up_proj and down_proj beside the base replays too (the experts' LoRA path, kernels/triton_lora_moe.py,
captured). The CPU form (Triton interpreter, the capture stand-in): tests/kernels/test_lora_graphs.py. Run by the GPU
plan's `tests-engine` step."""
from __future__ import annotations

import os
import random

import pytest
import torch

from moelink.engine import LLM, LoRARequest, SamplingParams

from tests.helpers.graph_replays import count_replays
from tests.helpers.lora_peft import random_adapter

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

KW = dict(dtype="float32", device="cuda", enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=64,
          block_size=16, max_num_seqs=8, max_num_batched_tokens=512, enable_prefix_caching=False)
ADAPTERS = {"attn": (("q_proj", "k_proj", "v_proj", "o_proj"), 1), "qv": (("q_proj", "v_proj"), 2),
            "o": (("o_proj",), 3), "experts": (("q_proj",), 4)}  # "experts": and the routed experts' tensors


def _run(llm, prompts, loras, max_tokens):
    # The adapters read into host memory first (engine/lora/loader.py: otherwise a request waits for its adapter's
    # read while the base's start), so that every request is scheduled at once and the steps fall on known sizes.
    loader = llm.engine.lora_admission.loader
    for r in loras:
        if r is not None:
            loader.request(r)
    while loader.reading():
        loader.poll(0.05)
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=2) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    return [(o.outputs[0].token_ids, [{t: lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs])
            for o in outs]


def test_lora_decode_graphs_match_eager(tiny_model, tmp_path):
    path = tiny_model("qwen3_e6k3")
    reqs = {name: LoRARequest(name, i + 1, random_adapter(path, str(tmp_path / name), targets, 8, 16, seed,
                                                          experts_down=name == "experts",
                                                          experts_gate_up=name == "experts"))
            for i, (name, (targets, seed)) in enumerate(ADAPTERS.items())}
    prompt = [random.Random(4).randrange(3, 500) for _ in range(40)]
    # Five rows (the size-8 graph, 3 padding rows), then 4, 2 and 1 as they finish.
    first = ([prompt] * 5, [reqs["attn"], reqs["qv"], None, reqs["attn"], None], [9, 7, 5, 3, 8])
    second = ([prompt] * 2, [reqs["o"], reqs["attn"]], [6, 6])
    third = ([prompt] * 2, [reqs["experts"], None], [6, 6])
    eager = LLM(path, enforce_eager=True, **KW)
    try:
        assert eager.engine.executor.runner.graphs is None
        want = [_run(eager, *first), _run(eager, *second), _run(eager, *third)]
    finally:
        eager.shutdown()
    llm = LLM(path, cuda_graph_sizes=[1, 2, 4, 8], **KW)
    try:
        runner = llm.engine.executor.runner
        assert runner.graphs is not None and set(runner.graphs.steps) == {1, 2, 4, 8}, "graphs were not captured"
        replays = count_replays(runner.graphs)
        got = [_run(llm, *first)]
        assert replays[8] >= 1 and replays[2] >= 1 and replays[1] >= 1, replays
        before = replays[2]
        got.append(_run(llm, *second))
        assert replays[2] >= before + 4, replays
        before = replays[2]
        got.append(_run(llm, *third))
        assert replays[2] >= before + 4, replays  # the routed experts' adapter: its decode steps replayed
    finally:
        llm.shutdown()
    print(f"LoRA decode graphs: replays per size {replays}")
    for run_w, run_g in zip(want, got):
        for (tok_w, lps_w), (tok_g, lps_g) in zip(run_w, run_g):
            assert tok_g == tok_w
            for lw, lg in zip(lps_w, lps_g):
                assert lw.keys() == lg.keys()
                assert max(abs(lw[t] - lg[t]) for t in lw) < 1e-4
