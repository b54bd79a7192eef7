"""Batch-invariant mode with real decode CUDA graphs on a GPU (engine/rank/graph_policy.py; docs/rl.md#batch-invariant-mode):
the `batch_invariant_triton` backend's decode steps replay graphs captured inside its step context, with the
attention's split grid sized by max_model_len, and a request's tokens and logprobs are bitwise those of the eager
invariant engine, alone (the batch-1 graph) and in a batch whose decode steps replay padded graphs of other sizes.
Its prompt ends just before a 512-key split edge (kernels/triton_invariant_attention.py SPLIT_KEYS), so its decode
steps cross it. The CPU form (Triton interpreter, the capture stand-in): tests/kernels/test_batch_invariant_graphs.py.
Run by the GPU plan's `rl` step."""
from __future__ import annotations

import os
import random

import pytest
import torch

from moelink.engine import LLM, SamplingParams

from tests.helpers.graph_replays import count_replays

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

KW = dict(dtype="bfloat16", device="cuda", batch_invariant=True, num_kv_blocks=256, block_size=16, max_num_seqs=8,
          max_num_batched_tokens=4096, max_model_len=1024, enable_prefix_caching=False)


def _run(llm, prompts, max_tokens):
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=0) for m in max_tokens]
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outs]


def test_invariant_decode_graphs_give_a_request_the_eager_bits_alone_and_batched(tiny_model):
    from moelink.kernels.triton_invariant_attention import SPLIT_KEYS

    path = tiny_model("qwen3_e6k3")
    rng = random.Random(5)
    target = [rng.randrange(3, 500) for _ in range(SPLIT_KEYS - 3)]  # decodes at positions 509-520
    # Six prompts prefilled in one step (the token budget holds them), then their decode steps shrink as they
    # finish: 5 rows on the size-8 graph (3 padding rows), 4 and 3 on size 4, 2, then the request alone on size 1.
    others = [[rng.randrange(3, 500) for _ in range(n)] for n in (40, 700, 5, 530, 12)]
    eager = LLM(path, enforce_eager=True, **KW)
    try:
        assert eager.engine.executor.runner.graphs is None
        want = _run(eager, [target], [12])[0]
    finally:
        eager.shutdown()
    llm = LLM(path, cuda_graph_sizes=[1, 2, 4, 8], **KW)
    try:
        runner = llm.engine.executor.runner
        assert runner.kernels.name == "batch_invariant_triton"
        assert runner.graphs is not None and set(runner.graphs.steps) == {1, 2, 4, 8}, "graphs were not captured"
        replays = count_replays(runner.graphs)
        alone = _run(llm, [target], [12])[0]
        assert replays[1] >= 10, replays
        batched = _run(llm, others[:3] + [target] + others[3:], [3, 9, 1, 12, 6, 2])[3]
        assert replays[8] >= 1 and replays[4] >= 1 and replays[2] >= 1, replays
    finally:
        llm.shutdown()
    print(f"batch-invariant decode graphs: replays per size {replays}")
    assert alone == want
    assert batched == want
