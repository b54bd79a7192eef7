"""Batch-invariant mode under expert and tensor parallelism (issue 58 item 4, docs/rl.md): at EP 2 (CPU ranks on Ray,
gloo) a
target request's tokens and logprobs are bitwise the same alone and in batches of 8 and 16 spread over both ranks'
schedulers, with its tokens' experts served on the other rank beside other requests' tokens; and a decode step's
logprob equals the re-prefill's prompt logprob. Each rank's experts run per expert on fixed tiles, and a token's
outputs come back one row per serving rank, summed in rank order (comm/a2a_base.py): nothing reduces across tokens.
With two-batch overlap too (each step two micro-batches). At TP 2 the same, the row-parallel layers' partial sums gathered and added in rank order (engine/tp/group.py; two
partials add the same either way, so what the order changes at 3 ranks and more is tests/comm/test_tp_ordered_sums.py:
there gloo's all-reduce gives a position's partials other bits as the buffer changes)."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams

from tests.helpers.parity import prompts

pytestmark = pytest.mark.slow

GEN = 5


def _record(out):
    c = out.outputs[0]
    return list(c.token_ids), [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]


@pytest.mark.parametrize("model,layout", [("qwen3_e6k3", "ep"), ("dsv3_lora", "ep"), ("qwen3_e6k3", "tp"),
                                          ("qwen3_e6k3", "ep_tbo")])
def test_ep2_gives_a_request_the_same_bits_in_any_batch(local_ray, tiny_model, hf_tiny_model, model, layout):
    path = tiny_model(model) if model == "qwen3_e6k3" else hf_tiny_model(model)
    ps = prompts(128, seed=61, n=16, lo=3, hi=60)
    target, others = ps[1], ps[2:] + ps[:1]
    params = SamplingParams(temperature=0.0, max_tokens=GEN, ignore_eos=True, logprobs=0)
    # ep_tbo: two-batch overlap, every step as two micro-batches whose dispatches overlap the other's experts.
    size = {"ep": {"expert_parallel_size": 2}, "tp": {"tensor_parallel_size": 2},
            "ep_tbo": {"expert_parallel_size": 2, "enable_two_batch_overlap": True}}[layout]
    llm = LLM(path, dtype="float32", **size, max_num_seqs=16, max_num_batched_tokens=64,
              num_kv_blocks=256, block_size=8, batch_invariant=True, enable_prefix_caching=False)
    try:
        records = [_record(llm.generate([target], params, use_tqdm=False)[0])]
        for size, at in ((8, 3), (16, 10)):
            batch = others[: size - 1]
            batch = batch[:at] + [target] + batch[at:]
            records.append(_record(llm.generate(batch, params, use_tqdm=False)[at]))
        assert all(r == records[0] for r in records), [i for i, r in enumerate(records) if r != records[0]]
        tokens, logprobs = records[0]
        again = llm.generate([target + tokens], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
        assert [again.prompt_logprobs[len(target) + i][t].logprob for i, t in enumerate(tokens)] == logprobs
    finally:
        llm.shutdown()
