"""Flint (FlintForCausalLM: RecursiveSI/flint) against transformers 5.24's own model: config reading and its refusals,
and greedy parity with transformers' `generate` in float64, token for token: 1-150-token prompts together under a
small token budget (chunked prefill, batches), again under a KV pool small enough to preempt, prefix-cache hits,
transformers 5's own checkpoint names. What the family adds: a learned sink per head (published as
self_attn.softmax_offset), rotary and a sliding window on the sliding layers only (NoPE full layers), the top-k of
sigmoid scores renormalised (RouterConfig topk_sigmoid with norm_topk_prob), an ungated shared expert, dense layers by
mlp_only_layers. Checkpoints: the family's tiny model (engine/models/flint/tiny.py: its router and sinks drawn),
saved by transformers."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.flint.tiny import FLINT, save_flint

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def flint_path(tmp_path_factory) -> str:
    return save_flint(tmp_path_factory.mktemp("flint"))


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(FLINT, **overrides), edit)


def test_config(tmp_path):
    """GQA 4 / 2 with the per-head q/k norm and sinks; layers 2 and 3 sliding (window 6, rotary), 0, 1 and 4 NoPE;
    layer 0 dense; sigmoid top-2 of 8 renormalised in float32; an ungated shared expert 32 wide."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, m = cfg.attention, cfg.moe
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.sinks) == (4, 2, 16, "per_head", True)
    assert (a.sliding_layers, a.sliding_window, a.nope_layers) == ((2, 3), 6, (0, 1, 4))
    assert cfg.sparse_layers == (1, 2, 3, 4) and (cfg.num_experts, cfg.top_k) == (8, 2)
    r = m.router
    assert (r.scoring_func, r.topk_method, r.norm_topk_prob, r.float32_logits) == ("sigmoid", "topk_sigmoid", True,
                                                                                     True)
    assert (m.n_shared_experts, m.shared_expert_intermediate_size, m.shared_expert_gate) == (1, 32, False)


@pytest.mark.parametrize("edit,match", [
    (set_fields(mlp_only_layers=[0, 1, 2, 3, 4]), r"config.json mlp_only_layers=\[0, 1, 2, 3, 4\] is not supported"),
    (set_fields(decoder_sparse_step=0), r"config.json decoder_sparse_step=0 is not supported"),
    (set_fields(shared_expert_intermediate_size=-1), r"config.json shared_expert_intermediate_size=-1 is not "
                                                     r"supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts, self_attn.sinks) gives transformers' tokens."""
    path = save_flint(tmp_path, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(flint_path):
    check_chunked_batched(flint_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(flint_path):
    check_under_preemption(flint_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(flint_path):
    check_prefix_cache_parity(LLM, flint_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_biases_not_renormalised_parity(tmp_path):
    """attention_bias (q/k/v and o_proj), norm_topk_prob off (each pick its own sigmoid), no shared expert."""
    path = save_flint(tmp_path, attention_bias=True, norm_topk_prob=False, shared_expert_intermediate_size=0)
    ps = prompts(VOCAB, seed=17, n=4, lo=2, hi=40)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default FlintConfig (Flint's published sizes) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "FlintConfig")()
    cfg.architectures = ["FlintForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "FlintForCausalLM"
