"""Qwen2-MoE (Qwen2MoeForCausalLM: Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B) against transformers 5.24's own model: config
reading and its refusals, and greedy parity with transformers' `generate` in float64, token for token: 1-150-token
prompts together under a small token budget (chunked prefill, batches), again under a KV pool small enough to
preempt, prefix-cache hits, transformers 5's own checkpoint names, and the sliding-window layers
use_sliding_window makes. What the family adds: q/k/v biases, a shared expert behind a sigmoid gate beside
softmax top-k routing that is not renormalised, dense layers by mlp_only_layers. Checkpoints: the family's tiny
model (engine/models/qwen2_moe/tiny.py, drawn by save_drawn_preset), saved by transformers."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.qwen2_moe.tiny import QWEN2_MOE

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("qwen2_moe"), QWEN2_MOE)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(QWEN2_MOE, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """GQA 4 / 2 with q/k/v biases and no q/k norm; layer 1 dense (mlp_only_layers); softmax top-2 not renormalised;
    one shared expert 32 wide behind its sigmoid gate."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, m = cfg.attention, cfg.moe
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.rope.rotary_dim) == (4, 2, 16, None, 16)
    assert a.qkv_bias and not a.o_bias and a.sliding_window is None and not a.sliding_layers
    assert cfg.sparse_layers == (0, 2) and (cfg.num_experts, cfg.top_k) == (6, 2)
    assert (m.router.scoring_func, m.router.norm_topk_prob) == ("softmax", False) and not cfg.norm_topk_prob
    assert (m.n_shared_experts, m.shared_expert_intermediate_size, m.shared_expert_gate) == (1, 32, True)
    assert (cfg.moe_intermediate_size, cfg.intermediate_size) == (16, 48)


def test_config_sparse_step_and_sliding_layers(tmp_path):
    """decoder_sparse_step 2 routes the odd layers only; use_sliding_window makes the even layers below
    max_window_layers sliding (transformers' layer_types)."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, num_hidden_layers=4, mlp_only_layers=[],
                                                  decoder_sparse_step=2, use_sliding_window=True, sliding_window=6,
                                                  max_window_layers=3, shared_expert_intermediate_size=0))
    assert cfg.sparse_layers == (1, 3) and cfg.moe.n_shared_experts == 0 and not cfg.moe.shared_expert_gate
    assert cfg.attention.sliding_layers == (0, 2) and cfg.attention.sliding_window == 6


@pytest.mark.parametrize("edit,match", [
    (set_fields(layer_types=["full_attention", "chunked_attention", "full_attention"]),
     r"config.json layer_types=\[.*'chunked_attention'.*\] is not supported"),
    (set_fields(decoder_sparse_step=0), r"decoder_sparse_step=0 is not supported: allowed: an integer >= 1"),
    (set_fields(shared_expert_intermediate_size=-1), r"shared_expert_intermediate_size=-1 is not supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (set_fields(mlp_only_layers=[0, 1, 2]), r"num_experts=6 is not supported: .*at least one routed layer"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts) runs as the published layout does: transformers'
    tokens for two prompts."""
    path = save_preset(tmp_path, QWEN2_MOE, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(qwen2_path):
    check_chunked_batched(qwen2_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(qwen2_path):
    check_under_preemption(qwen2_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(qwen2_path):
    check_prefix_cache_parity(LLM, qwen2_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_sliding_window_parity(tmp_path):
    """use_sliding_window: layers 0 and 2 attend to the last 6 keys (prompts of up to 60 tokens, 10x the window)."""
    path = save_preset(tmp_path, QWEN2_MOE, use_sliding_window=True, sliding_window=6, max_window_layers=3)
    ps = prompts(VOCAB, seed=17, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


# -- FP8 ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fp8_block_checkpoint(tmp_path):
    """The FP8 block layout (`moelink quantize-fp8`, 16 x 16 blocks; the dense layer moved to 2 so layer 1 is routed)
    loads through the FP8 block path and gives the greedy tokens of transformers' float64 model on the dequantized
    weights with the W8A8 activation rounding where the engine applies it. The router, the shared expert's gate and
    the norms stay float."""
    from tests.helpers.fp8_checkpoints import check_fp8_gqa_block_parity

    check_fp8_gqa_block_parity(save_preset(tmp_path / "float", QWEN2_MOE, mlp_only_layers=[2]), tmp_path, VOCAB)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default Qwen2MoeConfig (Qwen1.5-MoE-A2.7B's sizes (60 experts, top-4, a shared expert 5632 wide)) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "Qwen2MoeConfig")()
    cfg.architectures = ["Qwen2MoeForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "Qwen2MoeForCausalLM"
