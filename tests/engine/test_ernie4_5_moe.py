"""ERNIE-4.5-MoE (Ernie4_5_MoeForCausalLM: ERNIE-4.5-21B-A3B, -300B-A47B) against transformers 5.24's own model:
config reading and its refusals, the router against transformers' Ernie4_5_MoeTopKRouter, and greedy parity with
transformers' `generate` in float64, token for token: 1-150-token prompts together under a small token budget
(chunked prefill, batches), again under a KV pool small enough to preempt, prefix-cache hits, and transformers 5's
own checkpoint names (the correction bias under the router). What the family adds: an interleaved rope on GQA (q/k
rows de-interleaved at load: gqa.rope_rows), softmax routing selected with a [1, E] correction bias (its checkpoint
kind, kinds.py), dense layers outside moe_layer_start_index..moe_layer_end_index. Checkpoints: the family's tiny
model (engine/models/ernie4_5_moe/tiny.py, drawn by save_drawn_preset), saved by transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.ernie4_5_moe.tiny import ERNIE

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def ernie_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("ernie"), ERNIE)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(ERNIE, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """GQA 4 / 2 with the interleaved rope over the whole head; layers 1-2 routed (softmax selected with the
    correction bias, float32 router, renormalised), 0 and 3 dense; two shared experts."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, r = cfg.attention, cfg.moe.router
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.rope.rotary_dim, a.rope.style) == (
        4, 2, 16, None, 16, "interleaved")
    assert not a.qkv_bias and not a.o_bias
    assert cfg.sparse_layers == (1, 2) and cfg.moe.n_shared_experts == 2
    assert (r.scoring_func, r.topk_method, r.n_group, r.norm_topk_prob, r.float32_logits) == (
        "softmax", "noaux_tc", 1, True, True)
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.intermediate_size) == (6, 2, 16, 48)


def test_config_end_index_minus_one_and_interval(tmp_path):
    """moe_layer_end_index -1 is the last layer (transformers' config says so); interval 2 routes the odd layers."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, moe_layer_start_index=0, moe_layer_end_index=-1,
                                                  moe_layer_interval=2))
    assert cfg.sparse_layers == (1, 3)


@pytest.mark.parametrize("edit,match", [
    (set_fields(use_bias=True), r"config.json use_bias=True is not supported for Ernie4_5_MoeForCausalLM"),
    (set_fields(moe_layer_interval=0), r"config.json moe_layer_interval=0 is not supported: allowed: an integer >= 1"),
    (set_fields(moe_layer_start_index=3, moe_layer_end_index=2),
     r"config.json moe_layer_start_index=3 is not supported: allowed: a range with at least one routed layer"),
    (set_fields(moe_norm_min=0.5), r"config.json moe_norm_min=0.5 is not supported: allowed: a number in \[0, "),
    (set_fields(moe_num_shared_experts=-1), r"config.json moe_num_shared_experts=-1 is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_router_matches_transformers():
    """Softmax in float32 over every expert, the top-k of softmax + correction bias, the unbiased probabilities
    renormalised: transformers' Ernie4_5_MoeTopKRouter, ids and weights equal."""
    from transformers.models.ernie4_5_moe.modeling_ernie4_5_moe import Ernie4_5_MoeTopKRouter

    from moelink.moe.router import make_router
    from moelink.moe.router_config import RouterConfig

    hf_cfg = config_of(ERNIE, moe_num_experts=12, moe_k=3)
    hf = Ernie4_5_MoeTopKRouter(hf_cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=gen))
        hf.moe_statics.e_score_correction_bias.copy_(torch.randn(1, 12, generator=gen) * 0.1)
    router = make_router(RouterConfig(12, 3, "softmax", "noaux_tc", 1, 1, True, float32_logits=True))
    x = torch.randn(31, hf_cfg.hidden_size, generator=gen, dtype=torch.float64)
    _, want_w, want_ids = hf(x)
    w, ids = router(torch.nn.functional.linear(x.float(), hf.weight), hf.moe_statics.e_score_correction_bias[0])
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order).double(), want_w.gather(1, want_order), rtol=1e-6, atol=0)


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts, the correction bias at mlp.gate.moe_statics) runs
    as the published layout does: transformers' tokens for two prompts."""
    path = save_preset(tmp_path, ERNIE, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(ernie_path):
    check_chunked_batched(ernie_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(ernie_path):
    check_under_preemption(ernie_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(ernie_path):
    check_prefix_cache_parity(LLM, ernie_path, VOCAB, n=3, max_suffix=5)


def test_lora_is_refused(ernie_path):
    """Its q/k rows are de-interleaved at load: an adapter's B rows there are untested against peft."""
    with pytest.raises(ValueError, match=r"enable_lora is not supported for Ernie4_5_MoeForCausalLM yet: its q/k rows"):
        LLM(ernie_path, dtype="float64", enable_lora=True)


# -- FP8 ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fp8_block_checkpoint(tmp_path):
    """The FP8 block layout (`moelink quantize-fp8`, 16 x 16 blocks: each head's 16 q/k rows one block, so the
    de-interleaving keeps every row in its block) loads through the FP8 block path and gives the greedy tokens of
    transformers' float64 model on the dequantized weights with the W8A8 activation rounding where the engine applies
    it. The router, its correction bias and the norms stay float."""
    from tests.helpers.fp8_checkpoints import check_fp8_gqa_block_parity

    check_fp8_gqa_block_parity(save_preset(tmp_path / "float", ERNIE), tmp_path, VOCAB)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default Ernie4_5_MoeConfig (ERNIE-4.5-21B-A3B's sizes (64 experts, top-6, 2 shared, layer 0 dense)) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "Ernie4_5_MoeConfig")()
    cfg.architectures = ["Ernie4_5_MoeForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "Ernie4_5_MoeForCausalLM"
