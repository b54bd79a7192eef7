"""EXAONE-MoE (ExaoneMoeForCausalLM, K-EXAONE) against transformers 5.24's own model: config reading and its
refusals, the router against transformers' ExaoneMoeTopkRouter, and greedy parity with transformers' `generate` in
float64, token for token: 1-150-token prompts together under a small token budget (chunked prefill, batches),
again under a KV pool small enough to preempt, prefix-cache hits across the 6-token window, and transformers 5's
own checkpoint names. What the family adds: full-attention layers without rotary beside sliding ones with it
(GQAConfig.nope_layers). Checkpoints: the family's tiny model (engine/models/exaone_moe/tiny.py, drawn by save_drawn_preset), saved by
transformers (tests/helpers/drawn_presets.py); EP 2 and TP 2 in tests/ep/test_tp_families.py."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config import kv_sizing
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.exaone_moe.tiny import EXAONE, WINDOW
from moelink.moe.router_config import RouterConfig

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def exaone_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("exaone"), EXAONE)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(EXAONE, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """"LLLG" over 5 layers (transformers' pattern, the last layer not forced global): 0-2 and 4 sliding with
    rotary, 3 full without; a dense first layer; DeepSeek-V3 routing in 2 groups with the shared expert."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, r = cfg.attention, cfg.moe.router
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.rope.rotary_dim) == (4, 2, 16, "per_head", 16)
    assert a.sliding_layers == (0, 1, 2, 4) and a.nope_layers == (3,) and a.sliding_window == WINDOW
    assert [a.window(i) for i in range(5)] == [WINDOW, WINDOW, WINDOW, None, WINDOW]
    assert [a.rotates(i) for i in range(5)] == [True, True, True, False, True]
    assert not a.qkv_bias and not a.o_bias and not a.sinks and not cfg.layer_attention
    assert (r.scoring_func, r.topk_method, r.n_group, r.topk_group, r.norm_topk_prob, r.routed_scaling_factor,
            r.float32_logits) == ("sigmoid", "noaux_tc", 2, 1, True, 2.5, True)
    assert cfg.sparse_layers == (1, 2, 3, 4) and cfg.moe.n_shared_experts == 1
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.intermediate_size) == (8, 2, 16, 48)
    # 3 sliding layers and 1 full: no (full, sliding) pairs share tensors; every layer caches K and V of 2 heads.
    assert cfg.kv_layer_pairs() is None
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == 5 * 2 * 2 * 16 * 4  # float32 (the config's dtype, unset)


def test_config_without_window_is_transformers_refusal(tmp_path):
    """sliding_window null: transformers 5.24's config refuses it (an int field), so no layer goes without a
    window and rotary both; the error names the field."""
    with pytest.raises(ValueError, match=r"(?s)transformers could not read config.json: .*'sliding_window'"):
        ModelConfig.from_pretrained(_config_dir(tmp_path, set_fields(sliding_window=None)))


@pytest.mark.parametrize("edit,match", [
    (set_fields(layer_types=["sliding_attention"] * 4 + ["chunked_attention"]),
     r"config.json layer_types=\[.*'chunked_attention'\] is not supported: allowed: one of 'sliding_attention', "
     r"'full_attention' for each of the num_hidden_layers=5 layers"),
    # transformers' own validators catch these first: the error still names the field.
    (set_fields(layer_types=["sliding_attention"] * 4),
     r"(?s)transformers could not read config.json: .*`num_hidden_layers` \(5\) must be equal to the number of "
     r"`layer_types` \(4\)"),
    (set_fields(mlp_layer_types=["dense", "sparse", "moe", "sparse", "sparse"]),
     r"(?s)transformers could not read config.json: .*`mlp_layer_types` entries must be in"),
    (set_fields(attention_bias=True), r"attention_bias=True is not supported for ExaoneMoeForCausalLM"),
    (set_fields(sliding_window=0), r"sliding_window=0 is not supported: allowed: null or a positive integer"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_router_matches_transformers():
    """Sigmoid scores in float32, the top-k of scores + correction bias within the best topk_group of n_group
    groups, the unbiased weights renormalised and scaled: transformers' ExaoneMoeTopkRouter, ids and weights equal."""
    from transformers.models.exaone_moe.modeling_exaone_moe import ExaoneMoeTopkRouter

    from moelink.moe.router import make_router

    hf_cfg = config_of(EXAONE, num_experts=12, n_group=3, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
    hf = ExaoneMoeTopkRouter(hf_cfg)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=gen))
        hf.e_score_correction_bias.copy_(torch.randn(12, generator=gen) * 0.5)
    router = make_router(RouterConfig(12, 3, "sigmoid", "noaux_tc", 3, 2, True, 2.5, float32_logits=True))
    x = torch.randn(31, hf_cfg.hidden_size, generator=gen, dtype=torch.float64)
    _, want_w, want_ids = hf(x)
    w, ids = router(torch.nn.functional.linear(x.float(), hf.weight), hf.e_score_correction_bias)
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order), rtol=0, atol=0)


def test_nope_layer_builds_without_rotary(exaone_path):
    """The one full layer rotates nothing: its q and k go to the cache as normed (the parity tests below fail
    if it rotates: measured, prompt 0 differs from its sixth token)."""
    with LLM(exaone_path, dtype="float64", max_num_seqs=1, num_kv_blocks=16, block_size=8) as llm:
        layers = llm.engine.executor.worker.runner.model.layers
        assert [layer.self_attn.rotary for layer in layers] == [True, True, True, False, True]
        assert [layer.self_attn.sliding_window for layer in layers] == [WINDOW, WINDOW, WINDOW, None, WINDOW]


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts, the correction bias under the router) runs as the
    published layout does: transformers' tokens for two prompts."""
    path = save_preset(tmp_path, EXAONE, fused=True, num_hidden_layers=4)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(exaone_path):
    check_chunked_batched(exaone_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(exaone_path):
    check_under_preemption(exaone_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(exaone_path):
    """A 64-token cached prefix (10x the window): sliding and NoPE layers read it from the one block table."""
    check_prefix_cache_parity(LLM, exaone_path, VOCAB, n=3, max_suffix=5)


# -- prefill/decode disaggregation ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_pd_transfer_equals_one_engine(exaone_path):
    """A prefill engine saves each prompt's KV (sliding and NoPE layers alike), a decode engine loads it over TCP:
    the decode side computes only each prompt's last token, its tokens equal one engine's, both pools end free."""
    from tests.helpers.kv_disagg import check_pd_transfer

    check_pd_transfer(exaone_path, prompts(VOCAB, seed=31, n=4, lo=2, hi=40))



# -- FP8 ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fp8_block_checkpoint(tmp_path):
    """The FP8 block layout (`moelink quantize-fp8`, 16 x 16 blocks) loads through the FP8 block path and gives the
    greedy tokens of transformers' float64 model on the dequantized weights with the W8A8 activation rounding where
    the engine applies it. The router, its correction bias and the norms stay float."""
    from tests.helpers.fp8_checkpoints import check_fp8_gqa_block_parity

    check_fp8_gqa_block_parity(save_preset(tmp_path / "float", EXAONE), tmp_path, VOCAB)
