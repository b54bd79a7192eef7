"""Expert parallelism on Ray (CPU, gloo) for DeepSeek-V4.1 (issue 81) at EP 2 (6 experts, 3/3): attention is data
parallel, so each rank keeps its own sequences' window rings, its KV sources' compressed entries and index keys and
its Engram look-back; greedy outputs equal transformers' main-branch V4.1 in float64 (tests/fixtures/deepseek_v41/,
as tests/engine/test_deepseek_v41.py reads it), in one step or as two micro-batches, every block back."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from tests.engine.test_deepseek_v41 import N, PROMPTS, TINY, WANT
from tests.helpers.parity import assert_same, engine_greedy

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("tbo", [False, True])
def test_deepseek_v41_ep2_matches_transformers(local_ray, tbo):
    llm = LLM(TINY, expert_parallel_size=2, enable_two_batch_overlap=tbo, dtype="float64", max_num_seqs=4,
              max_num_batched_tokens=24, num_kv_blocks=96, block_size=8)
    try:
        assert_same(engine_greedy(llm, PROMPTS, N), WANT, PROMPTS)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


def test_deepseek_v41_published_fp4_ep2_matches_transformers(local_ray, tmp_path):
    """DeepSeek's files with FP4 routed experts (as V4.1-Flash ships them) at EP 2: each rank reads its own experts'
    packed bytes; tokens equal transformers' on the dequantized twin with the shared expert's W8A8 rounding
    (reference_published.json)."""
    import json

    from tests.engine.test_deepseek_v41 import FIXTURES
    from tests.helpers.dsv41_published import write_published

    cases = json.loads((FIXTURES / "reference_published.json").read_text())["expert_dtype"]["fp4"]
    ps, want = [c["prompt"] for c in cases], [c["greedy"] for c in cases]
    write_published(FIXTURES / "tiny", tmp_path / "published", tmp_path / "twin", expert_dtype="fp4")
    llm = LLM(str(tmp_path / "published"), expert_parallel_size=2, dtype="float64", max_num_seqs=4,
              max_num_batched_tokens=24, num_kv_blocks=96, block_size=8)
    try:
        assert_same(engine_greedy(llm, ps, N), want, ps)
    finally:
        llm.engine.shutdown()
