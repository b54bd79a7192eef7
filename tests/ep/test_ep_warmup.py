"""Start-up warm-up at EP 2 on Ray (CPU, gloo): the full plan (what the Triton kernels get; forced here on the
reference kernels) runs on both ranks with their all-to-alls paired, under the fixed-capacity two-mode backend
and two-batch overlap, and changes nothing: the greedy tokens are a single rank's, the expert load counted is
the workload's alone, every KV block comes back."""
from __future__ import annotations

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.rank.warmup import WarmupConfig

pytestmark = pytest.mark.slow

KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=96, block_size=8)


def _generate(llm):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [40, 41, 42], list(range(100, 170))]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.engine.moe_metrics.total_routed()


def test_the_full_warm_up_pairs_its_collectives_on_every_rank_and_changes_no_token(local_ray, tiny_model):
    path = tiny_model("qwen3_e6k3")
    with LLM(path, **KW) as one:
        want = _generate(one)
    # The full warm-up is minutes of small steps on a loaded 2-core machine: its step deadline and the heartbeat
    # watchdog's are raised (a rank starved past the 10 s default was dropped once, 2026-11-26, in a whole run).
    with LLM(path, expert_parallel_size=2, all_to_all="torch_padded", enable_two_batch_overlap=True,
             step_timeout=120.0, heartbeat_timeout=60.0, **KW) as llm:
        reports = llm.engine.executor.warm_up(WarmupConfig(32, 4, plan="full"))
        assert [r.rank for r in reports] == [0, 1]
        # The forward phases are the same steps on both ranks (their collectives pair up).
        assert [(n, c) for n, c, _ in reports[0].phases if n != "moe"] == \
               [(n, c) for n, c, _ in reports[1].phases if n != "moe"]
        assert {n for n, _, _ in reports[0].phases} >= {"moe", "prefill", "decode", "mixed", "sampler"}
        assert _generate(llm) == want
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
