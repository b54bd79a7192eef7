"""OLMoE (OlmoeForCausalLM: OLMoE-1B-7B) against transformers 5.24's own model: config reading and its refusals, and
greedy parity with transformers' `generate` in float64, token for token: 1-150-token prompts together under a small
token budget (chunked prefill, batches), again under a KV pool small enough to preempt, prefix-cache hits, and
attention biases. What the family adds: q/k RMSNorm over the whole projection (GQAConfig "all_heads", as MiniMax-M2)
and clip_qkv (GQAConfig.clip_qkv: q, k, v clamped after the norm, before rotary; about a third of the values are
clamped at the preset's 1.0). Checkpoints: the family's tiny model (engine/models/olmoe/tiny.py, drawn by
save_drawn_preset), saved by transformers."""
from __future__ import annotations

import json

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.olmoe.tiny import OLMOE

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def olmoe_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("olmoe"), OLMOE)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(OLMOE, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """GQA 4 / 2, q/k normed over all heads, clamped at 1.0; every layer routed, softmax top-2 not renormalised."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, r = cfg.attention, cfg.moe.router
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.clip_qkv) == (4, 2, 16, "all_heads", 1.0)
    assert not a.qkv_bias and not a.o_bias and a.rope.rotary_dim == 16
    assert cfg.sparse_layers == (0, 1, 2) and cfg.moe.n_shared_experts == 0
    assert (r.scoring_func, r.norm_topk_prob, cfg.num_experts, cfg.top_k) == ("softmax", False, 8, 2)
    assert cfg.moe_intermediate_size == 16


def test_config_biases_and_no_clip(tmp_path):
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, attention_bias=True, clip_qkv=None))
    assert cfg.attention.qkv_bias and cfg.attention.o_bias and cfg.attention.clip_qkv is None


@pytest.mark.parametrize("edit,match", [
    (set_fields(clip_qkv=0.0), r"config.json clip_qkv=0.0 is not supported: allowed: null or a finite number > 0"),
    (set_fields(clip_qkv=-1.5), r"config.json clip_qkv=-1.5 is not supported"),
    (set_fields(head_dim=8), r"config.json head_dim=8 is not supported: allowed: hidden_size / num_attention_heads"),
    (set_fields(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), r"rope_type"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_clip_changes_transformers_tokens(olmoe_path, tmp_path):
    """The preset's clamp decides tokens: without clip_qkv transformers' own greedy tokens differ (so the parity
    tests below see it)."""
    import shutil

    unclipped = tmp_path / "unclipped"
    shutil.copytree(olmoe_path, unclipped)
    raw = json.loads((unclipped / "config.json").read_text())
    (unclipped / "config.json").write_text(json.dumps({**raw, "clip_qkv": None}))
    ps = prompts(VOCAB, seed=61, n=4, lo=20, hi=80)
    assert hf_greedy(str(unclipped), ps) != hf_greedy(olmoe_path, ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(olmoe_path):
    check_chunked_batched(olmoe_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(olmoe_path):
    check_under_preemption(olmoe_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(olmoe_path):
    check_prefix_cache_parity(LLM, olmoe_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_attention_bias_parity(tmp_path):
    """attention_bias: biases on q, k, v and o_proj (drawn), the clamp after the biased, normed projections."""
    path = save_preset(tmp_path, OLMOE, attention_bias=True)
    ps = prompts(VOCAB, seed=23, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


# -- FP8 ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fp8_block_checkpoint(tmp_path):
    """The FP8 block layout (`moelink quantize-fp8`, 16 x 16 blocks) loads through the FP8 block path and gives the
    greedy tokens of transformers' float64 model on the dequantized weights with the W8A8 activation rounding where
    the engine applies it (the clamp after the FP8 projection and the all-heads norm)."""
    from tests.helpers.fp8_checkpoints import check_fp8_gqa_block_parity

    check_fp8_gqa_block_parity(save_preset(tmp_path / "float", OLMOE), tmp_path, VOCAB)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default OlmoeConfig (OLMoE-1B-7B's sizes (64 experts, top-8)) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "OlmoeConfig")()
    cfg.architectures = ["OlmoeForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "OlmoeForCausalLM"
