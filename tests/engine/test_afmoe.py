"""AFMoE (AfmoeForCausalLM: Arcee's Trinity-Mini / -Nano / -Large) against transformers 5.24's own model: config
reading and its refusals, and greedy parity with transformers' `generate` in float64, token for token: 1-150-token
prompts together under a small token budget (chunked prefill, batches), again under a KV pool small enough to
preempt, prefix-cache hits, transformers 5's own checkpoint names. What the family adds: four norms a layer (residual
kind "afmoe"), the attention output gated by sigmoid(gate_proj(x)) (GQAConfig.output_gate, gate_proj read into the q
stack's gate rows), rotary and a sliding window on the sliding layers only (NoPE full layers), the muP embedding
scale, sigmoid routing with expert_bias and route_scale beside shared experts after dense layers. Checkpoints: the
family's tiny model (engine/models/afmoe/tiny.py: its router and expert bias drawn), saved by transformers."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.afmoe.tiny import AFMOE, save_afmoe

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def afmoe_path(tmp_path_factory) -> str:
    return save_afmoe(tmp_path_factory.mktemp("afmoe"))


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(AFMOE, **overrides), edit)


def test_config(tmp_path):
    """GQA 4 / 2 with the per-head q/k norm and the output gate; layers 0 and 2 sliding (window 6, rotary), 1 and 3
    full and NoPE; layer 0 dense; sigmoid noaux_tc top-2 of 8 in one group, renormalised, times route_scale 2."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, r = cfg.attention, cfg.moe.router
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.output_gate) == (4, 2, 16, "per_head", True)
    assert (a.sliding_layers, a.sliding_window, a.nope_layers) == ((0, 2), 6, (1, 3))
    assert cfg.sparse_layers == (1, 2, 3) and (cfg.num_experts, cfg.top_k) == (8, 2)
    assert (r.scoring_func, r.topk_method, r.n_group, r.norm_topk_prob, r.routed_scaling_factor) == (
        "sigmoid", "noaux_tc", 1, True, 2.0)
    assert (cfg.moe.n_shared_experts, cfg.moe_intermediate_size, cfg.intermediate_size) == (1, 16, 48)


@pytest.mark.parametrize("edit,match", [
    (set_fields(attention_bias=True), r"config.json attention_bias=True is not supported for AFMoE"),
    (set_fields(num_dense_layers=4), r"config.json num_dense_layers=4 is not supported: allowed: an integer in "
                                     r"\[0, num_hidden_layers=4\)"),
    (set_fields(num_shared_experts=-1), r"config.json num_shared_experts=-1 is not supported"),
    (set_fields(layer_types=["full_attention", "chunked_attention", "full_attention", "full_attention"]),
     r"config.json layer_types=\[.*'chunked_attention'.*\] is not supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts) runs as the published layout does: transformers'
    tokens for two prompts."""
    path = save_afmoe(tmp_path, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(afmoe_path):
    check_chunked_batched(afmoe_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(afmoe_path):
    check_under_preemption(afmoe_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(afmoe_path):
    check_prefix_cache_parity(LLM, afmoe_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_without_mup_tied_and_all_full(tmp_path):
    """mup_enabled off, tied embeddings, every layer full (NoPE), two shared experts: transformers' tokens."""
    path = save_afmoe(tmp_path, mup_enabled=False, tie_word_embeddings=True, global_attn_every_n_layers=1,
                      num_shared_experts=2)
    ps = prompts(VOCAB, seed=17, n=4, lo=2, hi=40)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default AfmoeConfig (Trinity-Mini's sizes) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "AfmoeConfig")()
    cfg.architectures = ["AfmoeForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "AfmoeForCausalLM"
