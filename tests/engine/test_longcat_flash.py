"""LongCat-Flash (LongcatFlashForCausalLM) against transformers 5.24's own model: config reading (two engine layers
per transformers layer) and its refusals, the router against transformers' LongcatFlashTopkRouter (softmax scores
over routed and zero-computation experts, selected with the correction bias), and greedy parity with transformers'
`generate` in float64, token for token: 1-150-token prompts together under a small token budget (chunked prefill,
batches), again under a KV pool small enough to preempt, prefix-cache hits, and prefill/decode over TCP. What the
family adds: the shortcut-connected MoE (its residual kind, engine/models/longcat_flash/kinds.py), zero-computation
experts (MoEConfig.zero_experts) and MLA's LoRA scales (MLAConfig.q_scale / latent_scale, folded at load); each
parity test fails without each (measured: the identity experts dropped, or the scales not folded, prompt 0 differs
from its third token). Checkpoints: tests/helpers/longcat_checkpoints.py; EP 2 and TP 2 in
tests/ep/test_tp_families.py."""
from __future__ import annotations

import json
import math

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config import kv_sizing
from moelink.engine.config.model import ModelConfig
from moelink.moe.router_config import RouterConfig

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.longcat_checkpoints import VOCAB, longcat_config, save_longcat_checkpoint
from tests.helpers.parity import check_chunked_batched, check_prefix_cache_parity, check_under_preemption, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def longcat_path(tmp_path_factory) -> str:
    return save_longcat_checkpoint(tmp_path_factory.mktemp("longcat"))


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, longcat_config(**overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """2 transformers layers = 4 engine layers, the routed experts on the even ones; the router over 6 + 2."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, m = cfg.attention, cfg.moe
    assert cfg.num_layers == 4 and cfg.sparse_layers == (0, 2)
    assert (a.kind, a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim) == (
        "mla", 16, 16, 8, 8, 8)
    assert a.rope.style == "interleaved" and a.softmax_scale == 16 ** -0.5
    assert a.q_scale == math.sqrt(32 / 16) and a.latent_scale == math.sqrt(32 / 16)
    assert (cfg.num_experts, m.zero_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.intermediate_size) == (
        6, 2, 3, 16, 48)
    r = m.router
    assert (r.num_experts, r.scoring_func, r.topk_method, r.norm_topk_prob, r.routed_scaling_factor,
            r.float32_logits) == (8, "softmax", "noaux_tc", False, 6.0, True)
    # One MLA latent (kv_lora_rank + qk_rope_head_dim values) per engine layer: four per token.
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == 4 * (16 + 8) * 4  # float32 (the config's dtype, unset)


@pytest.mark.parametrize("edit,match", [
    (set_fields(head_dim=16), r"config.json head_dim=16 is not supported \(transformers rotates .*\): allowed: 8"),
    (set_fields(mlp_bias=True), r"mlp_bias=True is not supported for LongcatFlashForCausalLM"),
    (set_fields(n_routed_experts=0), r"n_routed_experts=0 is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_checkpoint_layers_count_in_sublayers(tmp_path, longcat_path):
    """The header check counts two engine layers per checkpoint layer: a file with one layer fewer than
    num_layers says so."""
    import shutil

    from moelink.engine.config.checkpoint_headers import check_checkpoint

    check_checkpoint(ModelConfig.from_pretrained(longcat_path))  # 2 layers held, 4 engine layers: whole
    short = tmp_path / "short"
    shutil.copytree(longcat_path, short)
    raw = json.loads((short / "config.json").read_text())
    raw["num_layers"] = 3
    (short / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"num_hidden_layers=6 disagrees with the checkpoint: it holds layers 0 to 1 "
                                         r"\(2 sublayers each\)"):
        check_checkpoint(ModelConfig.from_pretrained(str(short)))


def test_router_matches_transformers():
    """Softmax over routed + zero-computation experts in float32, the top-k of scores + correction bias, the
    unbiased scores times routed_scaling_factor: transformers' LongcatFlashTopkRouter, ids and weights equal."""
    from transformers.models.longcat_flash.modeling_longcat_flash import LongcatFlashTopkRouter

    from moelink.moe.router import make_router

    hf_cfg = longcat_config(n_routed_experts=9, zero_expert_num=3, moe_topk=4)
    hf = LongcatFlashTopkRouter(hf_cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        hf.classifier.weight.copy_(torch.randn(hf.classifier.weight.shape, generator=gen))
        hf.e_score_correction_bias.copy_(torch.randn(12, generator=gen) * 0.1)
    router = make_router(RouterConfig(12, 4, "softmax", "noaux_tc", 1, 1, False, 6.0, float32_logits=True))
    x = torch.randn(31, hf_cfg.hidden_size, generator=gen, dtype=torch.float64)
    _, want_w, want_ids = hf(x)
    w, ids = router(torch.nn.functional.linear(x.float(), hf.classifier.weight.float()), hf.e_score_correction_bias)
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
    torch.testing.assert_close(w.gather(1, order), want_w.gather(1, want_order), rtol=0, atol=0)
    assert (ids >= 9).any(), "no zero-computation expert picked: the case does not exercise them"


def test_zero_experts_take_the_token_itself():
    """MoELayer with zero-computation experts: a row whose k picks are all identity experts gets x times the sum of
    their weights, and no routed expert is counted for it."""
    from moelink.kernels.ops import ReferenceKernels
    from moelink.moe.layer import MoELayer
    from moelink.moe.router import make_router
    from moelink.moe.stats import MoEStats

    stats = MoEStats(1, 3, torch.device("cpu"))
    layer = MoELayer(8, 4, 3, make_router(RouterConfig(5, 2, "softmax", "noaux_tc", 1, 1, False, 2.0,
                                                       float32_logits=True)),
                     ReferenceKernels(), torch.float64, stats=stats, zero_experts=2)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, dtype=p.dtype) * 0.1)
        layer.e_score_correction_bias_G.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0, 5.0]))  # the identity experts win
    x = torch.randn(3, 8, dtype=torch.float64)
    scores = torch.softmax(torch.nn.functional.linear(x.float(), layer.gate_GD), dim=-1)
    want = x * (scores[:, 3:].sum(-1, keepdim=True) * 2.0).double()
    torch.testing.assert_close(layer(x), want)
    assert int(stats.counts_LG.sum()) == 0


def test_shortcut_layers_build(longcat_path):
    with LLM(longcat_path, dtype="float64", max_num_seqs=1, num_kv_blocks=16, block_size=8) as llm:
        layers = llm.engine.executor.worker.runner.model.layers
        assert [(layer.pair, layer.sub, layer.moe is not None) for layer in layers] == [
            (0, 0, True), (0, 1, False), (1, 0, True), (1, 1, False)]
        assert all(layer.moe.zero_experts == 2 for layer in layers[::2])


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=71, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(longcat_path):
    check_chunked_batched(longcat_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(longcat_path):
    check_under_preemption(longcat_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(longcat_path):
    check_prefix_cache_parity(LLM, longcat_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_pd_transfer_equals_one_engine(longcat_path):
    """A prefill engine saves each prompt's four latents per token, a decode engine loads them over TCP: the decode
    side computes only each prompt's last token, its tokens equal one engine's, both pools end free."""
    from tests.helpers.kv_disagg import check_pd_transfer

    check_pd_transfer(longcat_path, prompts(VOCAB, seed=37, n=4, lo=2, hi=40))


@pytest.mark.slow
def test_fp8_block_checkpoint(tmp_path):
    """The FP8 block layout (`moelink quantize-fp8`, 16 x 16 blocks: every sublayer's MLA and dense MLP, the routed
    experts) loads through the FP8 block path, q_b_proj's q scale applied to its output (an FP8 weight cannot take it
    folded), and gives the greedy tokens of transformers' float64 model on the dequantized weights with the W8A8
    activation rounding where the engine applies it (the zero-computation experts' picks unrounded). The router, its
    correction bias and the norms stay float."""
    from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
    from moelink.kernels.fp8 import FP8_DTYPE

    from tests.helpers.fp8_checkpoints import BLOCK, dequantized_copy, fake_quant_hf_model, hf_greedy_with
    from tests.helpers.parity import engine_greedy

    src = save_longcat_checkpoint(tmp_path / "float")
    dst = str(quantize_checkpoint(src, tmp_path / "fp8", BLOCK))
    deq = dequantized_copy(dst, tmp_path / "dequantized")
    ps = prompts(VOCAB, seed=5, n=4, lo=1, hi=40)
    with LLM(dst, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8) as llm:
        even, odd = llm.engine.executor.worker.runner.model.layers[:2]
        assert even.self_attn.q_b_proj.weight.dtype == FP8_DTYPE and even.self_attn.q_out_scale == math.sqrt(2)
        assert even.dense.gate_up_proj.weight.dtype == FP8_DTYPE and odd.mlp.gate_up_proj.weight.dtype == FP8_DTYPE
        assert even.moe.gate_GD.dtype != FP8_DTYPE
        got = engine_greedy(llm, ps, max_new=6)
    assert len({t for g in got for t in g}) > 5, "degenerate model"
    assert got == hf_greedy_with(fake_quant_hf_model(deq, BLOCK), ps, 6)
