"""Sarvam-MLA (SarvamMLAForCausalLM: sarvamai/sarvam-105b) against transformers 5.24's own model (DeepseekV3ForCausalLM
on a SarvamMLAConfig), served by the deepseek family's MLA blocks: config reading (the release's own config format:
num_experts, num_shared_experts, head_dim, rope_scaling type deepseek_yarn, as SarvamMLAConfig translates them), and
greedy parity with transformers' `generate` in float64, token for token: 1-150-token prompts together under a small
token budget (chunked prefill, batches), again under a KV pool small enough to preempt, prefix-cache hits, YaRN past
original_max_position_embeddings, transformers 5's own names. Checkpoints: the deepseek family's tiny model
(engine/models/deepseek/tiny.py SARVAM_MLA), saved by transformers, config.json naming SarvamMLAForCausalLM."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.deepseek.tiny import ARCHS, SARVAM_MLA
from moelink.engine.tools.tiny_families import published_as, save_drawn_preset

from tests.helpers.drawn_presets import VOCAB
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def _save(out, fused: bool = False, **overrides) -> str:
    """SARVAM_MLA as published (config.json: SarvamMLAForCausalLM), or in transformers 5's own names (`fused`)."""
    if fused:
        write = published_as(lambda o, **kw: save_drawn_preset(o, SARVAM_MLA, kw["seed"], dtype=kw["dtype"], fused=True,
                                                               **kw["overrides"]), "SarvamMLAForCausalLM")
    else:
        write = ARCHS["sarvam_mla"].write
    write(Path(out), seed=0, dtype=torch.float64, fmt="float", overrides=overrides)
    return str(out)


@pytest.fixture(scope="module")
def sarvam_mla_path(tmp_path_factory) -> str:
    return _save(tmp_path_factory.mktemp("sarvam_mla"))


def test_config(sarvam_mla_path):
    """MLA without q LoRA, the interleaved rope; sigmoid noaux_tc top-2 of 8 in one group, renormalised, times 2.5, in
    float32; layer 0 dense; one shared expert."""
    cfg = ModelConfig.from_pretrained(sarvam_mla_path)
    a, r = cfg.attention, cfg.moe.router
    assert cfg.architecture == "SarvamMLAForCausalLM" and a.kind == "mla" and cfg.num_kv_heads == cfg.num_heads
    assert a.q_lora_rank is None and a.rope.style == "interleaved"
    assert (r.scoring_func, r.topk_method, r.n_group, r.norm_topk_prob, r.routed_scaling_factor) == (
        "sigmoid", "noaux_tc", 1, True, 2.5)
    assert cfg.sparse_layers == (1, 2) and cfg.moe.n_shared_experts == 1


def test_release_config_format(sarvam_mla_path, tmp_path):
    """The release's config.json spelling (num_experts, num_shared_experts, head_dim = kv_lora_rank +
    qk_rope_head_dim, rope_scaling type deepseek_yarn) reads as SarvamMLAConfig translates it: a YaRN rope."""
    raw = json.load(open(f"{sarvam_mla_path}/config.json"))
    raw["num_experts"], raw["num_shared_experts"] = raw.pop("n_routed_experts"), 2
    raw.pop("n_shared_experts")
    raw["head_dim"] = raw["kv_lora_rank"] + raw["qk_rope_head_dim"]
    raw.pop("rope_parameters")
    raw["rope_scaling"] = dict({k: v for k, v in _YARN.items() if k != "rope_type"}, type="deepseek_yarn")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert cfg.num_experts == 8 and cfg.moe.n_shared_experts == 2 and cfg.attention.rope.rope_type == "yarn"


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts) gives transformers' tokens for two prompts."""
    path = _save(tmp_path, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(sarvam_mla_path):
    check_chunked_batched(sarvam_mla_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(sarvam_mla_path):
    check_under_preemption(sarvam_mla_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(sarvam_mla_path):
    check_prefix_cache_parity(LLM, sarvam_mla_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_yarn_parity(tmp_path):
    """The release's YaRN (mscale_all_dim folded into the softmax scale), prompts past original_max_position_embeddings
    32."""
    path = _save(tmp_path, rope_parameters=_YARN)
    ps = prompts(VOCAB, seed=17, n=4, lo=20, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default SarvamMLAConfig (sarvam-105b's sizes) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "SarvamMLAConfig")()
    cfg.architectures = ["SarvamMLAForCausalLM"]
    cfg.save_pretrained(tmp_path)
    assert ModelConfig.from_pretrained(str(tmp_path)).architecture == "SarvamMLAForCausalLM"
