"""Two-batch overlap at EP 2 on Ray (CPU, gloo), float64: the same greedy tokens (and logprobs) as without it,
for Qwen3-MoE and DeepSeek-V3 (shared experts, dense first layer, MLA).

The workload covers prefill, chunked prefill (prompts up to 70 tokens under a 32-token budget), decode, and
empty micro-batches: every request has its own max_tokens, so the last one decodes alone (its rank splits one
sequence: the second micro-batch is empty) while the other rank has no tokens at all and runs both micro-batches
as collectives only; the two ranks must still issue the same collectives in the same order, or the step hangs.
"""
from __future__ import annotations

import random

import pytest

from moelink.engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

ENGINE_KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=96, block_size=8,
                 expert_parallel_size=2, step_timeout=120.0)


def _run(path: str, vocab: int, overlap: bool, all_to_all: str = "auto"):
    rng = random.Random(5)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in (1, 70, 9, 33, 4)]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, logprobs=1) for m in (3, 6, 9, 4, 12)]
    llm = LLM(path, enable_two_batch_overlap=overlap, all_to_all=all_to_all, **ENGINE_KW)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
        m = llm.engine.moe_metrics
        return [o.outputs[0] for o in outs], m.bytes_dispatched, m.total_routed()
    finally:
        llm.engine.shutdown()


_ONE_BATCH: dict[str, tuple] = {}  # model path -> _run without overlap on the default all-to-all


def _one_batch(path: str, vocab: int):
    if path not in _ONE_BATCH:
        _ONE_BATCH[path] = _run(path, vocab, False)
    return _ONE_BATCH[path]


# "torch" (the default at EP 2: counts synced, rows async) for both models; the fixed-capacity "torch_padded"
# (everything async) once, with overlap, against the same one-batch run on "torch" (one engine fewer): both
# backends carry the same payload rows (padding is not counted), so tokens, logprobs, routed pairs and bytes
# must all still agree.
@pytest.mark.parametrize("model,all_to_all", [("qwen3", "auto"), ("dsv3", "auto"), ("qwen3", "torch_padded")])
def test_two_batch_overlap_matches_one_batch(local_ray, tiny_model, hf_tiny_model, model, all_to_all):
    from tests.helpers.hf_checkpoints import hf_config
    from tests.helpers.tiny_configs import TINY_CONFIGS

    if model == "qwen3":
        path, vocab = tiny_model("qwen3_e6k3"), TINY_CONFIGS["qwen3_e6k3"]["vocab_size"]
    else:
        path, vocab = hf_tiny_model("dsv3_lora"), hf_config("dsv3_lora").vocab_size
    (off, off_bytes, off_routed), (on, on_bytes, on_routed) = (_one_batch(path, vocab),
                                                                _run(path, vocab, True, all_to_all))
    assert [o.token_ids for o in on] == [o.token_ids for o in off]
    for a, b in zip(on, off):
        for lp_a, lp_b in zip(a.logprobs, b.logprobs):
            assert lp_a.keys() == lp_b.keys()
            for t in lp_a:
                # The sampler returns float32 logprobs: float64 hidden states that differ in the last bits (matmuls
                # over fewer rows) may round to a neighbouring float32.
                assert lp_a[t].rank == lp_b[t].rank and abs(lp_a[t].logprob - lp_b[t].logprob) < 1e-5, \
                    (t, lp_a[t], lp_b[t])
    # The same (token, expert) pairs were routed; the rows moved are the same too (each token still goes once
    # per destination rank: splitting a step by sequences changes no token's destinations).
    assert on_routed == off_routed and on_bytes == off_bytes
