"""DeepSeek-V4.1 under tensor parallelism (issue 81): each rank holds half the heads (their wq_b rows and sinks) and
half the output groups (wo_a's rows, wo_b's columns: one all-reduce per layer); the shared KV head, the compressors,
the indexers, the window rings, the KV sources' entries and the Engram tables whole on each rank; the
hyper-connections replicated; the embedding and head vocab-parallel; the MoE block with every expert's channels split
(`-tp 2`) or in EP on token slices (`-tp 2 -ep 2`). On Ray (CPU ranks, gloo, float64) greedy tokens equal transformers' main-branch V4.1
(tests/fixtures/deepseek_v41/)."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from tests.engine.test_deepseek_v41 import N, PROMPTS, TINY, WANT
from tests.helpers.parity import assert_same, engine_greedy

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("ep", [1, 2])
def test_deepseek_v41_tp2_matches_transformers(local_ray, ep):
    """ep 2: the MoE block in EP over the group, each rank taking its slice of the tokens."""
    llm = LLM(TINY, tensor_parallel_size=2, expert_parallel_size=ep, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24,
              num_kv_blocks=96, block_size=8)
    try:
        assert_same(engine_greedy(llm, PROMPTS, N), WANT, PROMPTS)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


def test_deepseek_v41_published_fp8_tp2_matches_transformers(local_ray, tmp_path):
    """DeepSeek's FP8 files at -tp 2: each rank dequantizes its rows of wq_b / wo_a (wo_a's 8 rows a rank start
    mid-block: blocks of 16) and its columns of wo_b from the scale blocks covering them; the FP8 experts split by
    channels too. Tokens equal transformers' on the dequantized twin (reference_published.json)."""
    import json

    from tests.engine.test_deepseek_v41 import FIXTURES
    from tests.helpers.dsv41_published import write_published

    cases = json.loads((FIXTURES / "reference_published.json").read_text())["expert_dtype"]["fp8"]
    ps, want = [c["prompt"] for c in cases], [c["greedy"] for c in cases]
    write_published(FIXTURES / "tiny", tmp_path / "published", tmp_path / "twin", expert_dtype="fp8")
    llm = LLM(str(tmp_path / "published"), tensor_parallel_size=2, dtype="float64", max_num_seqs=4,
              max_num_batched_tokens=24, num_kv_blocks=96, block_size=8)
    try:
        assert_same(engine_greedy(llm, ps, N), want, ps)
    finally:
        llm.engine.shutdown()
