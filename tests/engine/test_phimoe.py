"""PhiMoE (Phi-3.5-MoE: PhiMoEForCausalLM as published, transformers' PhimoeForCausalLM) against transformers 5.24's
own model: the SparseMixer router against transformers' `sparsemixer` (eval mode), config reading and its refusals,
and greedy parity with transformers' `generate` in float64, token for token: 1-150-token prompts together under a
small token budget (chunked prefill, batches), again under a KV pool small enough to preempt, prefix-cache hits,
transformers 5's own checkpoint names, the published router jitter, and a sliding window on every layer. What the
family adds: SparseMixer routing (moe/router.SparseMixerRouter), LayerNorms with biases, q/k/v/o and LM-head biases.
Checkpoints: the family's tiny model (engine/models/phimoe/tiny.py, drawn by save_drawn_preset), saved by
transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.phimoe.tiny import LONGROPE, PHIMOE
from moelink.moe.router import SparseMixerRouter, make_router
from moelink.moe.router_config import RouterConfig

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_pool_free, assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def phimoe_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("phimoe"), PHIMOE)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(PHIMOE, **overrides), edit)


# -- the router ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("eps", [0.0, 0.01, 0.5, 2.0])
def test_sparsemixer_equals_transformers(eps):
    """Weights and ids as transformers' sparsemixer (eval) on float64 logits, ties and near-ties included; at
    jitter 0.5 the weights are neither softmax-top-2 nor its renormalisation."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    g = torch.Generator().manual_seed(7)
    logits = torch.randn(256, 8, generator=g, dtype=torch.float64) * 2
    logits[:8] = logits[:8].round()  # ties
    logits[8:16, 1] = logits[8:16, 0] * (1 - 1e-3)  # a runner-up within the jitter of the best
    router = make_router(RouterConfig(8, 2, "softmax", "sparsemixer", norm_topk_prob=False, jitter_eps=eps))
    assert isinstance(router, SparseMixerRouter) and router.route_args() is None
    w, ids = router(logits)
    want_w, want_ids = sparsemixer(logits.clone(), jitter_eps=eps, training=False)
    assert torch.equal(ids, want_ids) and w.dtype == torch.float64
    torch.testing.assert_close(w, want_w, rtol=0, atol=0)
    if eps == 0.5:
        softmax_top2 = torch.softmax(logits, -1).gather(1, ids)
        assert not torch.allclose(w, softmax_top2) and not torch.allclose(w, softmax_top2 / softmax_top2.sum(-1, True))


@pytest.mark.parametrize("kw,match", [
    (dict(top_k=3), r"num_experts_per_tok=3 is not supported: .*picks exactly 2"),
    (dict(norm_topk_prob=True), r"sparsemixer.*norm_topk_prob=False"),
    (dict(jitter_eps=-1.0), r"router_jitter_noise=-1.0 is not supported"),
])
def test_sparsemixer_config_refusals(kw, match):
    args = dict(num_experts=8, top_k=2, scoring_func="softmax", topk_method="sparsemixer", norm_topk_prob=False,
                jitter_eps=0.01)
    with pytest.raises(ValueError, match=match):
        RouterConfig(**{**args, **kw})


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """GQA 4 / 2 with q/k/v and o biases, no window; every layer routed by SparseMixer over 6 experts."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, r = cfg.attention, cfg.moe.router
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.rope.rotary_dim) == (4, 2, 16, None, 16)
    assert a.qkv_bias and a.o_bias and a.sliding_window is None and not a.sliding_layers
    assert cfg.sparse_layers == (0, 1, 2) and (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size) == (6, 2, 32)
    assert (r.scoring_func, r.topk_method, r.norm_topk_prob, r.jitter_eps) == ("softmax", "sparsemixer", False, 0.5)
    assert cfg.architecture == "PhimoeForCausalLM"


def test_published_name_is_transformers_model(tmp_path):
    """`make-tiny-model --arch phi35_moe` writes the release's name (PhiMoEForCausalLM) and its longrope: read as
    transformers' PhimoeForCausalLM, and transformers' tokens for two prompts past original_max_position_embeddings."""
    import json

    from moelink.engine.tools.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path / "m", "phi35_moe", dtype="float64")
    raw = json.loads((path / "config.json").read_text())
    assert raw["architectures"] == ["PhiMoEForCausalLM"] and raw["rope_parameters"]["rope_type"] == "longrope"
    ps = prompts(VOCAB, seed=4, n=2, lo=3, hi=40)
    llm = LLM(str(path), dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(str(path), ps, max_new=4), ps)


def test_config_longrope(tmp_path):
    """longrope: transformers' init gives the short factors' frequencies (no sequence length), cos/sin scaled by
    short_mscale (RopeConfig.attention_factor), not longrope's own attention factor."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, rope_parameters=LONGROPE))
    r = cfg.attention.rope
    assert (r.rope_type, r.attention_factor, r.rotary_dim) == ("longrope", 1.243163121016122, 16)


@pytest.mark.parametrize("edit,match", [
    (set_fields(rope_parameters={**LONGROPE, "long_mscale": 1.5}),
     r"rope_parameters.long_mscale=1.5 is not supported for PhimoeForCausalLM \(a scale switching"),
    (set_fields(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "short_mscale": 1.0,
                                 "long_mscale": 1.0, "original_max_position_embeddings": 256}),
     r"rope_parameters.rope_type='yarn' is not supported for PhimoeForCausalLM"),
    (set_fields(num_experts_per_tok=1), r"num_experts_per_tok=1 is not supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (set_fields(sliding_window=0), r"sliding_window=0 is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts, mlp.router) runs as the published layout does:
    transformers' tokens for two prompts."""
    path = save_preset(tmp_path, PHIMOE, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=71, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(phimoe_path):
    check_chunked_batched(phimoe_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(phimoe_path):
    check_under_preemption(phimoe_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(phimoe_path):
    check_prefix_cache_parity(LLM, phimoe_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [dict(router_jitter_noise=0.01, lm_head_bias=False),
                                    dict(sliding_window=6), dict(rope_parameters=LONGROPE)],
                         ids=["published_jitter_no_head_bias", "window", "longrope"])
def test_variant_parity(tmp_path, fields):
    """The published router_jitter_noise (0.01) without an LM head bias; a 6-token window on every layer (prompts
    of up to 60 tokens, 10x the window); longrope past original_max_position_embeddings (32)."""
    path = save_preset(tmp_path, PHIMOE, **fields)
    ps = prompts(VOCAB, seed=17, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)
    assert_pool_free(llm)
