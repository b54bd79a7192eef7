"""The cluster model prices DeepSeek Sparse Attention (issue 43): DeepSeek-V3.2 and GLM-5 rows beside DeepSeek-V3's,
their decode attention reading top-k latents and every indexer key (planner/models.ModelShape.attention_work)."""
from __future__ import annotations

import pytest

from moelink.planner.hardware import get_profile
from moelink.planner.models import MODELS, get_model
from moelink.planner.step_model import Setup, decode_step

V3, V32 = MODELS["deepseek-v3"], MODELS["deepseek-v3.2"]


def test_rows_match_published_sizes():
    # DeepSeek-V3.2-Exp: V3's 671B plus the indexers (64 x 128 heads from the 1536 q latent, a 128 key, 64 weights);
    # GLM-5: 744B.
    indexer = 61 * (1536 * 64 * 128 + 7168 * (128 + 64))
    assert V32.total_params() == pytest.approx(V3.total_params() + indexer)
    assert get_model("glm-5").total_params() == pytest.approx(744e9, rel=0.01)
    assert V32.kv_elems_per_token() == 576 + 128  # latent + rope, and the indexer key


def test_sparse_read_follows_topk_over_context():
    for ctx in (8192, 32768, 131072):
        dense_flops, dense_elems = V3.attention_work(ctx, decode=True)
        flops, elems = V32.attention_work(ctx, decode=True)
        # MLA reads 2048 latents whatever the context; the indexer reads every 128-value key.
        assert elems == 2048 * 576 + ctx * 128 and dense_elems == ctx * 576
        assert flops == 2048 * V3.attn_flops_per_key(True) + ctx * 2 * 64 * 128
    # Within top-k the two read the same latents (plus the keys).
    assert V32.attention_work(1000, True)[1] == V3.attention_work(1000, True)[1] + 1000 * 128


def test_decode_step_at_long_context():
    hw = get_profile("h200-hgx")
    times = {}
    for ctx in (2048, 8192, 32768, 131072):
        s = Setup(ep=8, batch_per_rank=32, context_len=ctx)
        times[ctx] = [decode_step(m, hw, s).breakdown["attn_core"] for m in (V3, V32)]
    assert times[2048][1] == pytest.approx(times[2048][0], rel=0.1)  # within top-k: as dense (+ the indexer)
    assert times[131072][1] < 0.2 * times[131072][0]
    assert times[131072][1] / times[8192][1] < 0.5 * times[131072][0] / times[8192][0]
