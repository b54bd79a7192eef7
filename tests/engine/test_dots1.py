"""dots.llm1 (Dots1ForCausalLM: rednote-hilab/dots.llm1.base, .inst) against transformers 5.24's own model: config
reading and its refusals, and greedy parity with transformers' `generate` in float64, token for token: 1-150-token
prompts together under a small token budget (chunked prefill, batches), again under a KV pool small enough to
preempt, prefix-cache hits, transformers 5's own checkpoint names, sliding layers. What the family adds: Qwen3's GQA
(per-head q/k norm) under DeepSeek-V3's MoE block (sigmoid scores with a correction bias within groups, renormalised,
routed_scaling_factor, shared experts, leading dense layers). Checkpoints: the family's tiny model
(engine/models/dots1/tiny.py, drawn by save_drawn_preset), saved by transformers."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.dots1.tiny import DOTS1

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def dots1_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("dots1"), DOTS1)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(DOTS1, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """GQA 4 / 2 with the per-head q/k norm, no biases, no sliding layers; layer 0 dense; sigmoid noaux_tc top-2 of 8
    in 2 groups (1 kept), renormalised, times 2.5, in float32; two shared experts 16 wide each."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, m = cfg.attention, cfg.moe
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.rope.rotary_dim) == (4, 2, 16, "per_head", 16)
    assert not a.qkv_bias and not a.o_bias and a.sliding_window is None and not a.sliding_layers
    assert cfg.sparse_layers == (1, 2) and (cfg.num_experts, cfg.top_k) == (8, 2)
    r = m.router
    assert (r.scoring_func, r.topk_method, r.n_group, r.topk_group) == ("sigmoid", "noaux_tc", 2, 1)
    assert (r.norm_topk_prob, r.routed_scaling_factor, r.float32_logits) == (True, 2.5, True)
    assert (m.n_shared_experts, m.first_k_dense_replace) == (2, 1)
    assert (cfg.moe_intermediate_size, cfg.intermediate_size) == (16, 48)


def test_config_sliding_layers_and_biases(tmp_path):
    """layer_types from sliding_window / max_window_layers (layers from max_window_layers on slide); attention_bias
    on q/k/v and o_proj alike."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, sliding_window=6, max_window_layers=1,
                                                  attention_bias=True))
    a = cfg.attention
    assert a.sliding_layers == (1, 2) and a.sliding_window == 6 and a.qkv_bias and a.o_bias


@pytest.mark.parametrize("edit,match", [
    (set_fields(layer_types=["full_attention", "chunked_attention", "full_attention"]),
     r"config.json layer_types=\[.*'chunked_attention'.*\] is not supported"),
    (set_fields(n_shared_experts=None), r"config.json n_shared_experts=None is not supported"),
    (set_fields(first_k_dense_replace=3), r"config.json first_k_dense_replace=3 is not supported: allowed: an "
                                          r"integer in \[0, num_hidden_layers=3\)"),
    (set_fields(n_routed_experts=None), r"config.json n_routed_experts=None is not supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts) runs as the published layout does: transformers'
    tokens for two prompts."""
    path = save_preset(tmp_path, DOTS1, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(dots1_path):
    check_chunked_batched(dots1_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(dots1_path):
    check_under_preemption(dots1_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(dots1_path):
    check_prefix_cache_parity(LLM, dots1_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_sliding_window_parity(tmp_path):
    """Layers 1 and 2 (from max_window_layers on) attend to the last 6 keys (prompts of up to 60 tokens)."""
    path = save_preset(tmp_path, DOTS1, sliding_window=6, max_window_layers=1)
    ps = prompts(VOCAB, seed=17, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


@pytest.mark.slow
def test_fp8_block_checkpoint(tmp_path):
    """The FP8 block layout (`moelink quantize-fp8`, 16 x 16 blocks) loads through the FP8 block path and gives the
    greedy tokens of transformers' float64 model on the dequantized weights with the W8A8 activation rounding where
    the engine applies it. The router, its correction bias and the norms stay float."""
    from tests.helpers.fp8_checkpoints import check_fp8_gqa_block_parity

    check_fp8_gqa_block_parity(save_preset(tmp_path / "float", DOTS1), tmp_path, VOCAB)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default Dots1Config with dots.llm1's published routing (its defaults leave n_routed_experts and
    n_shared_experts null, which builds no model) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "Dots1Config")(n_routed_experts=128, n_shared_experts=2, num_experts_per_tok=6,
                                               first_k_dense_replace=1, norm_topk_prob=True,
                                               routed_scaling_factor=2.5)
    cfg.architectures = ["Dots1ForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "Dots1ForCausalLM"
