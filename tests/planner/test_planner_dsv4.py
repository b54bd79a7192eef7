"""The cluster model prices DeepSeek-V4 (issue 45): V4-Flash and V4-Pro rows (planner/models.CompressedMQA: MQA over a
window plus CSA / HCA compressed entries, the grouped output projection), their sizes against the published totals,
KV bytes per token beside DeepSeek-V3's, and a decode step whose attention read grows less than the context."""
from __future__ import annotations

import pytest

from moelink.planner.hardware import get_profile
from moelink.planner.models import MODELS
from moelink.planner.step_model import Setup, decode_step, max_batch_per_rank

V3, FLASH, PRO = MODELS["deepseek-v3"], MODELS["deepseek-v4-flash"], MODELS["deepseek-v4-pro"]


def _active(m) -> float:
    return (m.num_layers * m.attn_proj_params() + m.moe_layers * (m.top_k + m.num_shared) * m.expert_params()
            + m.vocab * m.hidden)


def test_rows_match_published_sizes():
    # The model cards: V4-Flash 284B total, 13B active; V4-Pro 1.6T, 49B.
    assert FLASH.total_params() == pytest.approx(284e9, rel=0.01)
    assert _active(FLASH) == pytest.approx(13e9, rel=0.05)
    assert PRO.total_params() == pytest.approx(1.6e12, rel=0.03)
    assert _active(PRO) == pytest.approx(49e9, rel=0.03)


def test_kv_bytes_per_token_beside_deepseek_v3():
    # bf16, all layers: Flash's 21 CSA x (512 + 128) / 4 + 20 HCA x 512 / 128 = 3440 values vs V3's 61 x 576.
    assert FLASH.kv_elems_per_token() * FLASH.num_layers == pytest.approx(21 * 160 + 20 * 4)
    assert V3.kv_elems_per_token() * V3.num_layers / (FLASH.kv_elems_per_token() * FLASH.num_layers) > 10
    # the per-sequence window (43 x 128 x 512 values, bf16) and compressor rows (float32: CSA 8 x 2560, HCA 128 x 1024)
    assert FLASH.state_bytes_per_sequence(2) == 43 * 128 * 512 * 2 + (21 * 8 * 2560 + 20 * 128 * 1024) * 4


def test_attention_read_at_long_context_and_batch_that_fits():
    for m in (FLASH, PRO):
        e32, e128 = m.attention_work(32768, True)[1], m.attention_work(131072, True)[1]
        # the window and the top-k entries stay; the index keys (one per 4 tokens, CSA layers) and the HCA entries
        # grow with the context: less than linearly in all
        assert 2.5 < e128 / e32 < 3.5
        assert e128 < V3.attention_work(131072, True)[1] / 20
    hw = get_profile("h200-hgx")
    s = Setup(ep=8, batch_per_rank=32, context_len=131072)
    assert decode_step(FLASH, hw, s).breakdown["attn_core"] < decode_step(V3, hw, s).breakdown["attn_core"] / 5
    assert max_batch_per_rank(FLASH, hw, s, 131072) > 4 * max_batch_per_rank(V3, hw, s, 131072)
