"""Speculative verify steps replaying real CUDA graphs (engine/rank/cuda_graph.py) on a GPU: the capture of a
b x (1 + k)-token forward makes no host sync, and greedy outputs equal the eager engine's and plain decoding's.
(tests/kernels/test_verify_graphs.py checks the same path on CPU with the capture stood in for.)"""
from __future__ import annotations

import functools
import os
import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from moelink.benchmarks.spec_decode import OracleDrafter

from tests.helpers.graph_replays import count_replays

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]


@pytest.mark.parametrize("name", ["qwen3_e6k3", "dsv3_neox"])
def test_verify_graphs_replay_and_match_eager(tiny_model, hf_tiny_model, name):
    path = tiny_model(name) if name.startswith("qwen3") else hf_tiny_model(name)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, 400) for _ in range(n)] for n in (3, 40, 17, 90, 5, 64)]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    engine = dict(dtype="float32", device="cuda", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=256,
                  block_size=16, max_model_len=256)

    def run(**kw):
        with LLM(path, **engine, **kw) as llm:
            graphs = llm.engine.executor.worker.runner.graphs
            verify = count_replays(graphs, verify=True) if graphs is not None else {}
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            return [o.outputs[0].token_ids for o in outs], verify

    want, _ = run(enforce_eager=True)
    ref = {tuple(p): w for p, w in zip(prompts, want)}
    spec = {"method": "ngram", "num_speculative_tokens": 2,
            "drafter_factory": functools.partial(OracleDrafter, ref, 0.7, vocab=400, seed=3)}
    eager, _ = run(enforce_eager=True, speculative_config=spec)
    graphed, verify = run(speculative_config=spec)
    assert verify and sum(verify.values()) > 0, f"no verify step replayed a graph: {verify}"
    assert graphed == eager == want
