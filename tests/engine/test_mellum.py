"""Mellum (MellumForCausalLM: JetBrains' Mellum MoE) against transformers 5.24's own model: config reading and its
refusals, and greedy parity with transformers' `generate` in float64, token for token: 1-150-token prompts together
under a small token budget (chunked prefill, batches; sliding layers of window 6), again under a KV pool small enough
to preempt, prefix-cache hits, transformers 5's own checkpoint names. What the family adds: one rope per layer type
(rope_parameters.full_attention / .sliding_attention: ModelConfig.layer_attention), dense layers by
mlp_layer_types. Checkpoints: the family's tiny model (engine/models/mellum/tiny.py, drawn by save_drawn_preset), saved
by transformers."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.mellum.tiny import MELLUM

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def mellum_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("mellum"), MELLUM)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(MELLUM, **overrides), edit)


def test_config(tmp_path):
    """GQA 4 / 2 with the per-head q/k norm; layers 0 and 2 sliding (window 6) with theta 10000, 1 and 3 full with
    theta 500000; layer 0 dense; softmax top-2 of 8 renormalised."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    thetas = [a.rope.theta for a in cfg.layer_attention]
    assert thetas == [10000.0, 500000.0, 10000.0, 500000.0]
    a = cfg.attention_for(0)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.rope.rotary_dim) == (4, 2, 16, "per_head", 16)
    assert a.sliding_layers == (0, 2) and a.sliding_window == 6 and not a.qkv_bias
    assert cfg.sparse_layers == (1, 2, 3) and (cfg.num_experts, cfg.top_k) == (8, 2) and cfg.norm_topk_prob


@pytest.mark.parametrize("edit,match", [
    (set_fields(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 500000.0,
                                                    "partial_rotary_factor": 0.5},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
     r"config.json rope_parameters.full_attention.partial_rotary_factor=0.5 is not supported"),
    (set_fields(mlp_layer_types=["dense"] * 4), r"config.json mlp_layer_types=\['dense', .*\] is not supported: "
                                                r"allowed: at least one 'sparse' layer"),
    (set_fields(layer_types=["full_attention", "chunked_attention", "full_attention", "full_attention"]),
     r"config.json layer_types=\[.*'chunked_attention'.*\] is not supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts) gives transformers' tokens for two prompts."""
    path = save_preset(tmp_path, MELLUM, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(mellum_path):
    check_chunked_batched(mellum_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(mellum_path):
    check_under_preemption(mellum_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(mellum_path):
    check_prefix_cache_parity(LLM, mellum_path, VOCAB, n=3, max_suffix=5)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default MellumConfig reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "MellumConfig")()
    cfg.architectures = ["MellumForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "MellumForCausalLM"
