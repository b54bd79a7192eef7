"""GLM-4.7-Flash (Glm4MoeLiteForCausalLM, model_type glm4_moe_lite) against transformers 5.24's own model: config
reading and its refusals, and greedy parity with transformers' `generate` in float64, token for token: 1-150-token
prompts together under a small token budget (chunked prefill, batches), again under a KV pool small enough to
preempt, prefix-cache hits, transformers 5's own checkpoint names, rope not interleaved, and its MTP layer as the
speculative drafter (method "mtp": the drafts change no token). What the model is: DeepSeek-V3's MLA (q LoRA, the
latent cache, interleaved rope) with GLM-4.5's MoE block (DeepSeek-V3's sigmoid router with groups and correction
bias, one shared expert, routed_scaling_factor), its dense layers by mlp_layer_types alone (transformers' lite model
never reads first_k_dense_replace). The deepseek family's entry (engine/models/deepseek/config.py, reader.py);
checkpoints: its tiny preset (engine/models/deepseek/tiny.py GLM4_MOE_LITE, drawn by save_drawn_preset)."""
from __future__ import annotations

import shutil

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.deepseek.tiny import GLM4_MOE_LITE

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_pool_free, assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def lite_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("glm4_moe_lite"), GLM4_MOE_LITE)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(GLM4_MOE_LITE, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """MLA 4 heads (q LoRA 16, latent 16, nope 8 + rope 8, values 12) with interleaved rope; layers 0 and 2 dense
    (mlp_layer_types); DeepSeek-V3 routing in 2 groups, renormalised, times 1.8; one shared expert."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, r = cfg.attention, cfg.moe.router
    assert (a.kind, a.num_heads, a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim,
            a.v_head_dim) == ("mla", 4, 16, 16, 8, 8, 12)
    assert a.rope.style == "interleaved" and a.rope.rotary_dim == 8 and a.softmax_scale == pytest.approx(16 ** -0.5)
    assert cfg.sparse_layers == (1, 3) and cfg.moe.n_shared_experts == 1 and cfg.num_kv_heads == 4
    assert (r.scoring_func, r.topk_method, r.n_group, r.topk_group, r.norm_topk_prob, r.routed_scaling_factor,
            r.float32_logits) == ("sigmoid", "noaux_tc", 2, 1, True, 1.8, True)
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.intermediate_size) == (8, 2, 16, 48)


def test_config_default_layer_types_and_first_k_dense_replace_unread(tmp_path):
    """Without mlp_layer_types transformers' lite model makes layer 0 dense and the rest sparse, whatever
    first_k_dense_replace says (it never reads it); rope_interleave false rotates as neox."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, set_fields(mlp_layer_types=None, first_k_dense_replace=3),
                                                  rope_interleave=False))
    assert cfg.sparse_layers == (1, 2, 3) and cfg.attention.rope.style == "neox"


@pytest.mark.parametrize("edit,match", [
    (set_fields(mlp_layer_types=["dense", "sparse"]), r"mlp_layer_types=\['dense', 'sparse'\] is not supported"),
    (set_fields(scoring_func="softmax"), r"scoring_func='softmax' is not supported"),
    (set_fields(topk_method="greedy"), r"topk_method='greedy' is not supported"),
    (set_fields(rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
     r"rope_parameters.partial_rotary_factor=0.5 is not supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts) runs as the published layout does: transformers'
    tokens for two prompts."""
    path = save_preset(tmp_path, GLM4_MOE_LITE, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=47, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(lite_path):
    check_chunked_batched(lite_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(lite_path):
    check_under_preemption(lite_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(lite_path):
    check_prefix_cache_parity(LLM, lite_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_rope_not_interleaved_parity(tmp_path):
    path = save_preset(tmp_path, GLM4_MOE_LITE, rope_interleave=False)
    ps = prompts(VOCAB, seed=5, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


@pytest.mark.slow
def test_mtp_drafts_change_no_token(lite_path, tmp_path):
    """Its MTP layer (model.layers.{num_hidden_layers}.*, DeepSeek-V3's layout) drafts 2 tokens a step: greedy
    stays transformers' (which never runs the layer) token for token, every block freed."""
    from moelink.engine.tools.tiny_hf_model import add_mtp_layers

    path = tmp_path / "mtp"
    shutil.copytree(lite_path, path)
    add_mtp_layers(path, 1, seed=5)
    ps = prompts(VOCAB, seed=13, n=4, lo=2, hi=40)
    with LLM(str(path), dtype="float64", max_num_seqs=4, max_num_batched_tokens=32, num_kv_blocks=96, block_size=8,
             speculative_config={"method": "mtp", "num_speculative_tokens": 2}) as llm:
        assert_same(engine_greedy(llm, ps), hf_greedy(lite_path, ps), ps)
        assert_pool_free(llm)
