"""benchmarks/step_floor.py: the config-only count of what a step reads, held to the engine's built layers (the
count `engine_decode` makes from what it built) and the expected distinct experts to a draw of uniform routing."""
from __future__ import annotations

import pytest
import torch

from moelink.benchmarks import engine_decode, step_floor
from moelink.benchmarks.spec_decode import add_floors, step_floors


@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v2-lite"])
def test_config_count_matches_the_built_layer(model):
    """The smoke shape of each benchmark model, built by the engine's own model class on CPU: one MoE layer's bytes
    but its routed experts, one routed expert's bytes and the cache bytes a token takes, as the config count says."""
    _, hf, _ = engine_decode.MODELS[model]
    cfg, built, _ = engine_decode.build_model(hf, hf["num_hidden_layers"], torch.device("cpu"), "reference", 64)
    layer = next(layer for layer in built.layers if layer.moe is not None)
    dense, expert = step_floor.estimate_layer_bytes(hf)
    # The count takes four hidden-wide norms a layer; the layer has two, plus q / k norms (Qwen3) or the latent's
    # (MLA): a few hundred bytes of the layer's megabytes either way.
    assert dense == pytest.approx(engine_decode.layer_bytes(layer), rel=2e-3)
    moe = layer.moe
    assert expert == moe.w13_EFD[0].numel() * moe.w13_EFD.element_size() + moe.w2_EDI[0].numel() * moe.w2_EDI.element_size()
    assert step_floor.kv_bytes_per_token(hf) == cfg.attention.kv_bytes_per_token(cfg.cache_dtype)


@pytest.mark.parametrize("experts,top_k,tokens", [(128, 8, 1), (128, 8, 4), (128, 8, 12), (64, 6, 33)])
def test_expected_experts_touched_matches_a_uniform_draw(experts, top_k, tokens):
    g = torch.Generator().manual_seed(tokens)
    trials = 4000
    picks = torch.rand(trials, tokens, experts, generator=g).topk(top_k, dim=-1).indices  # uniform top-k per token
    hit = torch.zeros(trials, experts, dtype=torch.bool).scatter_(1, picks.view(trials, -1), True)
    drawn = hit.sum(1).double().mean().item()
    hf = dict(num_experts=experts, num_experts_per_tok=top_k)
    assert step_floor.expected_experts_touched(hf, tokens) == pytest.approx(drawn, rel=0.01)
    assert step_floor.expected_experts_touched(hf, 1) == pytest.approx(top_k)


def test_verify_floor_against_decode_floor():
    """Qwen3-30B-A3B's shape, 4 requests, 2 drafts: the verify step's 12 tokens touch ~69 experts a layer against the
    decode step's ~29, so its floor is over twice the decode step's; each part of a floor adds up, and only a GPU run
    (a copy bandwidth) gives rows a step over their floor."""
    hf = engine_decode.QWEN3_30B_A3B
    f = step_floors(hf, 4, 2, 64, None)
    assert f["decode"]["experts_touched_per_layer"] == pytest.approx(29.1, abs=0.1)
    assert f["verify"]["experts_touched_per_layer"] == pytest.approx(69.0, abs=0.1)
    assert 2.1 < f["ratio_verify_over_decode"] < 2.2
    for part in (f["decode"], f["verify"]):
        assert part["total"] == part["weights_but_experts"] + part["routed_experts"] + part["kv"] + part["head"]
    rows = {"plain": dict(ms_per_step=7.0), "p=0.8": dict(ms_per_step=9.0), "mtp": dict(ms_per_step=9.5)}
    add_floors(rows, f)
    assert all("step_over_floor" not in r for r in rows.values())
    g = step_floors(hf, 4, 2, 64, 4000.0)
    add_floors(rows, g)
    assert g["verify_ms"] == pytest.approx(g["verify"]["total"] / 4e12 * 1e3)
    assert rows["plain"]["step_over_floor"] == pytest.approx(7.0 / g["decode_ms"])
    assert rows["p=0.8"]["step_over_floor"] == pytest.approx(9.0 / g["verify_ms"])
    assert "step_over_floor" not in rows["mtp"]  # its drafter reads weights of its own
