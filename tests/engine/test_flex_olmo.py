"""FlexOlmo (FlexOlmoForCausalLM: allenai/FlexOlmo-7x7B-1T, -RT) against transformers 5.24's own model: config reading
and its refusals, and greedy parity with transformers' `generate` in float64, token for token: 1-150-token prompts
together under a small token budget (chunked prefill, batches), again under a KV pool small enough to preempt,
prefix-cache hits, transformers 5's own checkpoint names. What the family adds: OLMo 2's norms after each block and
none before (residual kind "flex_olmo"), its q/k norms over all heads, OLMoE's routing. Checkpoints: the family's tiny
model (engine/models/flex_olmo/tiny.py, drawn by save_drawn_preset), saved by transformers."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.flex_olmo.tiny import FLEX_OLMO

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def flex_olmo_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("flex_olmo"), FLEX_OLMO)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(FLEX_OLMO, **overrides), edit)


def test_config(tmp_path):
    """GQA 4 / 2 with the all-heads q/k norm, no biases; every layer routed, softmax top-2 of 7 not renormalised."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a = cfg.attention
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm) == (4, 2, 16, "all_heads")
    assert not a.qkv_bias and not a.o_bias
    assert cfg.sparse_layers == (0, 1, 2) and (cfg.num_experts, cfg.top_k) == (7, 2) and not cfg.norm_topk_prob
    assert cfg.moe.router.scoring_func == "softmax" and cfg.moe_intermediate_size == 16


def test_config_biases_and_renormalised(tmp_path):
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, attention_bias=True, norm_topk_prob=True))
    assert cfg.attention.qkv_bias and cfg.attention.o_bias and cfg.moe.router.norm_topk_prob


@pytest.mark.parametrize("edit,match", [
    (set_fields(num_experts=0), r"config.json num_experts=0 is not supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts) gives transformers' tokens for two prompts."""
    path = save_preset(tmp_path, FLEX_OLMO, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(flex_olmo_path):
    check_chunked_batched(flex_olmo_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(flex_olmo_path):
    check_under_preemption(flex_olmo_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(flex_olmo_path):
    check_prefix_cache_parity(LLM, flex_olmo_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_biases_renormalised_parity(tmp_path):
    """attention_bias (q/k/v and o_proj) and norm_topk_prob: transformers' tokens."""
    path = save_preset(tmp_path, FLEX_OLMO, attention_bias=True, norm_topk_prob=True)
    ps = prompts(VOCAB, seed=17, n=4, lo=2, hi=40)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default FlexOlmoConfig (FlexOlmo-7x7B's sizes) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "FlexOlmoConfig")()
    cfg.architectures = ["FlexOlmoForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "FlexOlmoForCausalLM"
