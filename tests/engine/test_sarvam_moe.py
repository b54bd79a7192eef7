"""Sarvam-MoE (SarvamMoEForCausalLM: sarvamai/sarvam-30b) against transformers 5.24's own model (Glm4MoeForCausalLM on
a SarvamMoEConfig): config reading and its refusals, and greedy parity with transformers' `generate` in float64,
token for token: 1-150-token prompts together under a small token budget (chunked prefill, batches), again under a
KV pool small enough to preempt, prefix-cache hits, the published names (q/k/v fused in attention.query_key_value with
its bias, word_embeddings, attention.dense, query_layernorm / key_layernorm, mlp.gate.expert_bias) and transformers
5's own. Checkpoints: the family's tiny model (engine/models/sarvam_moe/tiny.py), saved by transformers."""
from __future__ import annotations

import json

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.sarvam_moe.tiny import save_sarvam_moe

from tests.helpers.drawn_presets import VOCAB
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def sarvam_path(tmp_path_factory) -> str:
    return save_sarvam_moe(tmp_path_factory.mktemp("sarvam_moe"))


def _edited(src: str, tmp_path, **fields) -> str:
    """A copy of the checkpoint's config.json alone, `fields` set (config reading only)."""
    raw = json.load(open(f"{src}/config.json"))
    raw.update(fields)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(sarvam_path):
    """GQA 4 / 2 with q/k/v biases (none on o_proj) and the per-head q/k norm, the rotary over the whole head; layer 0
    dense; sigmoid noaux_tc top-2 of 8 in 2 groups (1 kept), renormalised, times 2.5, in float32; one shared
    expert."""
    cfg = ModelConfig.from_pretrained(sarvam_path)
    a, m = cfg.attention, cfg.moe
    assert cfg.architecture == "SarvamMoEForCausalLM"
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.rope.rotary_dim) == (4, 2, 16, "per_head", 16)
    assert a.qkv_bias and not a.o_bias
    assert cfg.sparse_layers == (1, 2) and (cfg.num_experts, cfg.top_k) == (8, 2)
    r = m.router
    assert (r.scoring_func, r.topk_method, r.n_group, r.topk_group) == ("sigmoid", "noaux_tc", 2, 1)
    assert (r.norm_topk_prob, r.routed_scaling_factor, r.float32_logits) == (True, 2.5, True)
    assert (m.n_shared_experts, m.first_k_dense_replace) == (1, 1)


def test_published_config_names(sarvam_path, tmp_path):
    """sarvam-30b's config.json spells num_experts, num_shared_experts and use_qkv_bias (SarvamMoEConfig's
    attribute_map)."""
    raw = json.load(open(f"{sarvam_path}/config.json"))
    for ours, theirs in (("n_routed_experts", "num_experts"), ("n_shared_experts", "num_shared_experts"),
                         ("attention_bias", "use_qkv_bias")):
        raw[theirs] = raw.pop(ours)
    raw["num_shared_experts"] = 2
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert cfg.num_experts == 8 and cfg.moe.n_shared_experts == 2 and cfg.attention.qkv_bias


@pytest.mark.parametrize("fields,match", [
    (dict(n_shared_experts=-1), r"config.json num_shared_experts=-1 is not supported"),
    (dict(first_k_dense_replace=3), r"config.json first_k_dense_replace=3 is not supported: allowed: an integer in "
                                    r"\[0, num_hidden_layers=3\)"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.1}),
     r"config.json partial_rotary_factor=0.1 is not supported"),
])
def test_config_refusals(sarvam_path, tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_edited(sarvam_path, tmp_path, **fields))


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (q/k/v apart, fused experts) runs as the published layout does:
    transformers' tokens for two prompts."""
    path = save_sarvam_moe(tmp_path, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(sarvam_path):
    check_chunked_batched(sarvam_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(sarvam_path):
    check_under_preemption(sarvam_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(sarvam_path):
    check_prefix_cache_parity(LLM, sarvam_path, VOCAB, n=3, max_suffix=5)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default SarvamMoEConfig (sarvam-30b's sizes) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "SarvamMoEConfig")()
    cfg.architectures = ["SarvamMoEForCausalLM"]
    cfg.save_pretrained(tmp_path)
    assert ModelConfig.from_pretrained(str(tmp_path)).architecture == "SarvamMoEForCausalLM"
