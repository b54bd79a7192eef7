"""EXAONE-MoE (ExaoneMoeForCausalLM, K-EXAONE) against transformers 5.24's own model: config reading and its
refusals, the router against transformers' ExaoneMoeTopkRouter, and greedy parity with transformers' `generate` in
float64, token for token: 1-150-token prompts together under a small token budget (chunked prefill, batches),
again under a KV pool small enough to preempt, prefix-cache hits across the 6-token window, and transformers 5's
own checkpoint names. What the family adds: full-attention layers without rotary beside sliding ones with it
(GQAConfig.nope_layers). Checkpoints: the family's tiny model (engine/models/exaone_moe/tiny.py, drawn by save_drawn_preset), saved by
transformers (tests/helpers/exaone_checkpoints.py); EP 2 and TP 2 in tests/ep/test_tp_families.py."""
from __future__ import annotations

import json

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config import kv_sizing
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.exaone_moe.tiny import WINDOW
from moelink.moe.router_config import RouterConfig

from tests.helpers.exaone_checkpoints import VOCAB, exaone_config as _config, save_exaone_checkpoint as save_checkpoint

from tests.helpers.parity import assert_pool_free, assert_same, check_prefix_cache_parity, engine_greedy, hf_greedy, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def exaone_path(tmp_path_factory) -> str:
    return save_checkpoint(tmp_path_factory.mktemp("exaone"))


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    _config(**overrides).save_pretrained(tmp_path)
    if edit is not None:
        raw = json.loads((tmp_path / "config.json").read_text())
        edit(raw)
        (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


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
        ModelConfig.from_pretrained(_config_dir(tmp_path, _set(sliding_window=None)))


def _set(**fields):
    return lambda raw: raw.update(fields)


@pytest.mark.parametrize("edit,match", [
    (_set(layer_types=["sliding_attention"] * 4 + ["chunked_attention"]),
     r"config.json layer_types=\[.*'chunked_attention'\] is not supported: allowed: one of 'sliding_attention', "
     r"'full_attention' for each of the num_hidden_layers=5 layers"),
    # transformers' own validators catch these first: the error still names the field.
    (_set(layer_types=["sliding_attention"] * 4),
     r"(?s)transformers could not read config.json: .*`num_hidden_layers` \(5\) must be equal to the number of "
     r"`layer_types` \(4\)"),
    (_set(mlp_layer_types=["dense", "sparse", "moe", "sparse", "sparse"]),
     r"(?s)transformers could not read config.json: .*`mlp_layer_types` entries must be in"),
    (_set(attention_bias=True), r"attention_bias=True is not supported for ExaoneMoeForCausalLM"),
    (_set(sliding_window=0), r"sliding_window=0 is not supported: allowed: null or a positive integer"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_router_matches_transformers():
    """Sigmoid scores in float32, the top-k of scores + correction bias within the best topk_group of n_group
    groups, the unbiased weights renormalised and scaled: transformers' ExaoneMoeTopkRouter, ids and weights equal."""
    from transformers.models.exaone_moe.modeling_exaone_moe import ExaoneMoeTopkRouter

    from moelink.moe.router import make_router

    hf_cfg = _config(num_experts=12, n_group=3, topk_group=2, num_experts_per_tok=3, routed_scaling_factor=2.5)
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
    path = save_checkpoint(tmp_path, fused=True, num_hidden_layers=4)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(exaone_path):
    ps = _prompts()
    llm = LLM(exaone_path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=256, block_size=8)
    got = engine_greedy(llm, ps)
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert_same(got, hf_greedy(exaone_path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_under_preemption(exaone_path):
    ps = _prompts()  # the chunked test's: transformers' outputs are cached
    # 32 blocks of 8 tokens hold one 150-token prompt and a little more: six running sequences must preempt.
    llm = LLM(exaone_path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=48, num_kv_blocks=32, block_size=8)
    got = engine_greedy(llm, ps)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_same(got, hf_greedy(exaone_path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_prefix_cache_hit_parity(exaone_path):
    """A 64-token cached prefix (10x the window): sliding and NoPE layers read it from the one block table."""
    check_prefix_cache_parity(LLM, exaone_path, VOCAB, n=3, max_suffix=5)


# -- prefill/decode disaggregation ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_pd_transfer_equals_one_engine(exaone_path):
    """A prefill engine saves each prompt's KV (sliding and NoPE layers alike), a decode engine loads it over TCP:
    the decode side computes only each prompt's last token, its tokens equal one engine's, both pools end free."""
    from moelink.engine import SamplingParams
    from moelink.engine.contract.kv_transfer_params import KVTransferParams
    from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteKVConnector

    from tests.helpers.kv_disagg import KW, MAX_NEW, Decoder, one_engine
    from tests.helpers.net import free_port

    ps = prompts(VOCAB, seed=31, n=4, lo=2, hi=40)  # past the 6-token window, chunked by the 32-token budget
    want = one_engine(exaone_path, ps)
    save = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True,
                          kv_transfer_params=KVTransferParams(do_remote_decode=True))
    pre = LLM(exaone_path, kv_connector=RemoteKVConnector(RemoteKVConfig(port=free_port(), transport="tcp")), **KW)
    dec = None
    try:
        outs = pre.generate(ps, save, use_tqdm=False)
        dec = Decoder(exaone_path, RemoteKVConfig(transport="tcp"))
        dec.add(ps, [SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True,
                                    kv_transfer_params=o.kv_transfer_params) for o in outs])
        got, cached = {}, {}
        while dec.llm.engine.has_requests():
            for o in dec.llm.engine.step():
                if o.finished:
                    got[o.request_id], cached[o.request_id] = o.outputs[0].token_ids, o.num_cached_tokens
        assert [got[f"d{i}"] for i in range(len(ps))] == want
        assert [cached[f"d{i}"] for i in range(len(ps))] == [len(p) - 1 for p in ps]
        assert dec.computed == len(ps) * MAX_NEW and dec.worker.stats.num_loaded == len(ps)
        for llm in (pre, dec.llm):
            stats = llm.engine.stats()
            assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        if dec is not None:
            dec.close()
        pre.engine.shutdown()


# -- FP8 ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_fp8_block_checkpoint(tmp_path):
    """The FP8 block layout (`moelink quantize-fp8`, 16 x 16 blocks) loads through the FP8 block path and gives the
    greedy tokens of transformers' float64 model on the dequantized weights with the W8A8 activation rounding where
    the engine applies it. The router, its correction bias and the norms stay float."""
    from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
    from moelink.kernels.fp8 import FP8_DTYPE

    from tests.helpers.fp8_checkpoints import BLOCK, dequantized_copy, fake_quant_hf_model, hf_greedy_with

    src = save_checkpoint(tmp_path / "float")
    dst = str(quantize_checkpoint(src, tmp_path / "fp8", BLOCK))
    deq = dequantized_copy(dst, tmp_path / "dequantized")
    cfg = ModelConfig.from_pretrained(dst, dtype="float64")
    assert cfg.quantization.method == "fp8" and cfg.quantization.block == BLOCK
    ps = prompts(VOCAB, seed=5, n=4, lo=1, hi=40)
    with LLM(dst, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8) as llm:
        layer = llm.engine.executor.worker.runner.model.layers[1]
        assert layer.self_attn.qkv_proj.weight.dtype == FP8_DTYPE and layer.moe.gate_GD.dtype != FP8_DTYPE
        got = engine_greedy(llm, ps, max_new=6)
    assert len({t for g in got for t in g}) > 5, "degenerate model"
    assert got == hf_greedy_with(fake_quant_hf_model(deq, BLOCK), ps, 6)
