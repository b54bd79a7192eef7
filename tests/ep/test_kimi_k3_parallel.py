"""Kimi K3 over two ranks (Ray, CPU ranks, gloo, float64) against its reference (tests/fixtures/kimi_k3/
reference.json, the float64 oracle of tests/engine/test_kimi_k3.py), token for token on the tiny checkpoint:
- EP 2: the latent MoE's 8 experts 4 / 4, the latent rows (16 wide, not the hidden 32) crossing the all-to-all, the
  router, latent projections, latent norm and the shared experts on the sending rank;
- TP 2: KDA's and MLA's heads split (their gates' rows with them), every expert's intermediate channels and the
  shared experts' split, the partial latents all-reduced before the latent norm (which is not linear) and the
  attention-residual mixes whole on every rank;
- TP 2 with EP 2: the MoE block on each rank's token slice;
- EP 2 on the published layout (MXFP4 experts), against one rank.
Lean: 4 prompts of 1-150 tokens (chunked prefill under a 24-token budget), their first 4 reference tokens."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from moelink.engine import LLM
from moelink.engine.models.kimi_k3.tiny import write_k3

from tests.helpers.parity import assert_same, engine_greedy

pytestmark = pytest.mark.slow

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures" / "kimi_k3" / "reference.json").read_text())
KW = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=128, block_size=4)
NEW = 4


@pytest.mark.parametrize("parallel", [dict(expert_parallel_size=2), dict(tensor_parallel_size=2),
                                      dict(tensor_parallel_size=2, expert_parallel_size=2)],
                         ids=["ep2", "tp2", "tp2_ep2"])
def test_two_ranks_match_the_reference(local_ray, tmp_path, parallel):
    path = write_k3(tmp_path / "k3", seed=0)
    cases = REFERENCE["cases"][:4]
    ps = [c["prompt"] for c in cases]
    llm = LLM(path, **parallel, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), [c["greedy"][:NEW] for c in cases], ps)
        assert all(s.num_free_blocks == s.num_total_blocks for s in llm.engine.rank_stats())
    finally:
        llm.engine.shutdown()


def test_ep_2_published_mxfp4_matches_one_rank(local_ray, tmp_path):
    """As published (MXFP4 experts, compressed-tensors' per-expert layout): each rank reads its 4 experts' packed
    values and scales; greedy tokens equal one rank's."""
    from moelink.engine.models.kimi_k3.tiny import ARCHS, write_published

    float_dir = write_k3(tmp_path / "float", seed=1, overrides=ARCHS["kimi_k3"].format_fields["published"])
    write_published(float_dir, tmp_path / "published")
    ps = [c["prompt"] for c in REFERENCE["cases"][:4]]
    want = engine_greedy(LLM(str(tmp_path / "published"), **KW), ps, max_new=NEW)
    llm = LLM(str(tmp_path / "published"), expert_parallel_size=2, **KW)
    try:
        assert_same(engine_greedy(llm, ps, max_new=NEW), want, ps)
    finally:
        llm.engine.shutdown()
