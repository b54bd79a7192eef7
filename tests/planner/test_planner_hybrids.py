"""The cluster model prices the hybrids and LongCat-Flash (issue 57): linear-attention layers beside full attention
(planner/models.LinearAttention: Qwen3-Next's gated DeltaNet, Kimi Linear's KDA), sliding-window layers
(SlidingWindow), zero-computation experts and shortcut-connected sublayers (LongCat-Flash); rows against the model
cards' totals, KV per token and per-sequence state, and a decode step that reads the recurrent state."""
from __future__ import annotations

from dataclasses import replace

import pytest

from moelink.engine.api import plan_cli
from moelink.planner.hardware import get_profile
from moelink.planner.models import GQA, MODELS, LinearAttention, ModelShape, SlidingWindow
from moelink.planner.step_model import Setup, decode_step, max_batch_per_rank, weights_per_rank_bytes

NEXT, KIMI, LONGCAT = MODELS["qwen3-next-80b-a3b"], MODELS["kimi-linear-48b-a3b"], MODELS["longcat-flash"]
QWEN3_30B = MODELS["qwen3-30b-a3b"]


@pytest.mark.parametrize("model, total, active, rel_active", [
    (NEXT, 80e9, 3e9, 0.15),      # Qwen3-Next-80B-A3B (the LM head counted active here, not on the card)
    (KIMI, 48e9, 3e9, 0.1),       # Kimi-Linear-48B-A3B
    (LONGCAT, 560e9, 27e9, 0.05),  # LongCat-Flash: 560B, 18.6-31.3B active, ~27B on average (8 of 12 picks real)
])
def test_rows_match_published_sizes(model, total, active, rel_active):
    assert model.total_params() == pytest.approx(total, rel=0.03)
    assert model.active_params() == pytest.approx(active, rel=rel_active)


def test_linear_layers_keep_state_not_kv():
    # Qwen3-Next: only its 12 GQA layers cache K and V per token (2 KV heads of 256); its 36 DeltaNet layers keep a
    # float32 state of 32 x 128 x 128 and the convolution's last 3 inputs of q, k, v (bf16) per sequence.
    assert NEXT.kv_elems_per_token() * NEXT.num_layers == 12 * 2 * 2 * 256
    conv = 3 * (2 * 16 * 128 + 32 * 128)
    assert NEXT.state_bytes_per_sequence(2) == 36 * (32 * 128 * 128 * 4 + conv * 2)
    assert NEXT.state_traffic_bytes() * NEXT.num_layers == 2 * 36 * (32 * 128 * 128 * 4 + conv * 2)
    # Kimi Linear: 6 MLA layers of latent + rope key
    assert KIMI.kv_elems_per_token() * KIMI.num_layers == 6 * (512 + 64)
    # A model without linear layers has no state (DeepSeek-V4 aside)
    assert QWEN3_30B.state_bytes_per_sequence(2) == QWEN3_30B.state_traffic_bytes() == 0


def test_attention_work_is_the_mean_over_layer_kinds():
    # Per layer (mean): 12 of 48 layers scale with the keys, 36 add a constant per token.
    f1, e1 = NEXT.attention_work(1000, True)
    f2, e2 = NEXT.attention_work(2000, True)
    per_key = 4 * 16 * 256
    assert (f2 - f1) * 48 == pytest.approx(12 * 1000 * per_key)
    assert (e2 - e1) * 48 == pytest.approx(12 * 1000 * 2 * 2 * 256)
    assert f1 * 48 == pytest.approx(12 * 1000 * per_key + 36 * 8 * 32 * 128 * 128)


def test_decode_reads_the_state_and_long_contexts_fit_more_sequences():
    hw = get_profile("h200-hgx")
    short = decode_step(NEXT, hw, Setup(ep=8, batch_per_rank=32, context_len=16))
    # At 16 tokens of context the step's attention bytes are mostly the recurrent state, not KV.
    assert NEXT.state_traffic_bytes() > NEXT.attention_work(16, True)[1] * 2 * 100
    assert short.breakdown["attn_core"] > 0
    s = Setup(ep=8, batch_per_rank=32, context_len=131072)
    dense_kv = replace(NEXT, name="next-all-gqa", linear=None)  # the same model with every layer GQA
    assert decode_step(NEXT, hw, s).breakdown["attn_core"] < decode_step(dense_kv, hw, s).breakdown["attn_core"] / 2
    assert max_batch_per_rank(NEXT, hw, s, 131072) > 2 * max_batch_per_rank(dense_kv, hw, s, 131072)


def test_zero_experts_and_sublayers_of_longcat():
    assert LONGCAT.routed_top_k == 8  # 12 picks x 512 real / 768
    assert LONGCAT.attention_blocks == 56 and LONGCAT.kv_attention_layers == 56
    assert LONGCAT.kv_elems_per_token() * LONGCAT.num_layers == 56 * (512 + 64)
    hw = get_profile("h200-hgx")
    s = Setup(ep=16, batch_per_rank=32, context_len=4096)
    bd = decode_step(LONGCAT, hw, s).breakdown
    assert bd["dense_ffn"] > 0 and bd["routed_experts"] > 0  # the two dense FFNs beside each layer's experts
    # Without the zero experts every pick is a real expert and is sent: up to 12 / 8 the expert work once the batch
    # is large enough to be compute-bound (the busiest rank's imbalance shrinks with more picks), more dispatch.
    real = replace(LONGCAT, name="longcat-no-zero", zero_experts=0)
    assert decode_step(real, hw, s).breakdown["dispatch"] > bd["dispatch"] * 1.05
    big = Setup(ep=16, batch_per_rank=1024, context_len=4096)
    ratio = decode_step(real, hw, big).breakdown["routed_experts"] / decode_step(LONGCAT, hw, big).breakdown[
        "routed_experts"]
    assert 1.25 < ratio <= 12 / 8
    # The router scores all 768 routes; the zero experts have no weights.
    rows = {(k, r) for k, r, _c, _n in LONGCAT.weight_matrices()}
    assert ("router", 768) in rows
    # (float32 router rows, as the MLA families route: the only difference in the weights a rank holds)
    assert weights_per_rank_bytes(LONGCAT, s) - weights_per_rank_bytes(real, s) == 256 * 6144 * 28 * 4


def test_sliding_window_layers_cache_a_window():
    m = replace(QWEN3_30B, name="qwen3-30b-sliding", sliding=SlidingWindow(layers=36, window=4096))
    per_token = 2 * 4 * 128
    assert m.kv_elems_per_token() * m.num_layers == 12 * per_token
    assert m.state_bytes_per_sequence(2) == 36 * 4096 * per_token * 2
    f_short, _ = m.attention_work(1000, True)
    f_long, _ = m.attention_work(100_000, True)
    assert f_long * 48 == pytest.approx(12 * 100_000 * 4 * 32 * 128 + 36 * 4096 * 4 * 32 * 128)
    assert f_short == pytest.approx(QWEN3_30B.attention_work(1000, True)[0])


def test_bad_shapes_name_the_field():
    with pytest.raises(ValueError, match="linear and sliding layers .48. must leave"):
        replace(QWEN3_30B, linear=LinearAttention(layers=48, num_heads=32, num_k_heads=16, head_k_dim=128,
                                                  head_v_dim=128))
    with pytest.raises(ValueError, match="num_heads=30 must be a multiple of num_k_heads=16"):
        LinearAttention(layers=1, num_heads=30, num_k_heads=16, head_k_dim=128, head_v_dim=128)
    with pytest.raises(ValueError, match="zero_experts=-1"):
        ModelShape("x", num_layers=2, first_dense=0, hidden=8, dense_intermediate=8, attention=GQA(2, 1, 4),
                   num_experts=4, num_shared=0, top_k=2, moe_intermediate=8, vocab=16, zero_experts=-1)


@pytest.mark.parametrize("model", ["qwen3-next-80b-a3b", "kimi-linear-48b-a3b", "longcat-flash"])
def test_moelink_plan_prices_them(model, capsys):
    assert plan_cli.main(["--model", model, "--hardware", "h200-hgx", "--ep", "8", "--batch-per-rank", "16"]) == 0
    out = capsys.readouterr().out
    assert f"{model} on h200-hgx" in out and "output tok/s/GPU" in out
