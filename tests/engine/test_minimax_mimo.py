"""MiniMax-M2 (MiniMaxM2ForCausalLM) and MiMo-V2-Flash (MiMoV2FlashForCausalLM) against transformers 5.24's own
models: config reading (tiny checkpoints and the published models' config.json), the refusals, the routers
against transformers' router modules, and greedy parity with transformers' `generate` in float64, token for
token: prompts of 1-150 tokens together under a small token budget (chunked prefill, batches of several
sequences), again under a KV pool small enough to preempt, and prefix-cache hits across MiMo's sliding window.
Checkpoints: tests.helpers.m2_checkpoints (saved by transformers).
"""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config import kv_sizing
from moelink.engine.config.model import ModelConfig
from moelink.moe.router_config import RouterConfig

from tests.helpers.m2_checkpoints import VOCAB, WINDOW, m2_config, save_m2_checkpoint
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity, check_under_preemption,
                                  engine_greedy, hf_greedy, prompts)


@pytest.fixture(scope="module")
def m2_path(tmp_path_factory):
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = save_m2_checkpoint(tmp_path_factory.mktemp(name), name)
        return built[name]

    return get


def _config_dir(tmp_path, name, edit=None, **overrides) -> str:
    m2_config(name, **overrides).save_pretrained(tmp_path)
    if edit is not None:
        raw = json.loads((tmp_path / "config.json").read_text())
        edit(raw)
        (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


# -- config ---------------------------------------------------------------------------------------------------

def test_minimax_config(tmp_path):
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, "minimax"))
    a, r = cfg.attention, cfg.moe.router
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.rope.rotary_dim) == (4, 2, 16, "all_heads", 4)
    assert not cfg.layer_attention and a.sliding_window is None and a.v_head_dim is None and not a.sinks
    assert (r.scoring_func, r.topk_method, r.n_group, r.topk_group, r.norm_topk_prob) == ("sigmoid", "noaux_tc", 1, 1,
                                                                                           True)
    assert not r.float32_logits and r.routed_scaling_factor == 1.0  # transformers' gate runs in the model dtype
    assert cfg.sparse_layers == (0, 1, 2) and (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size) == (6, 2, 16)
    assert cfg.moe.n_shared_experts == 0


def test_mimo_config_and_cache_layout(tmp_path):
    """Per-layer attention configs: the sliding layers' kv heads, sinks and rope are their own; the cache of each
    layer has its own shapes; sliding and full layers never share tensors when their shapes differ."""
    from moelink.engine.rank.kv_cache import make_kv_caches

    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, "mimo"))
    kinds = [cfg.attention_for(i) for i in range(cfg.num_layers)]
    assert [a.num_kv_heads for a in kinds] == [1, 2, 2, 1, 2] and [a.sinks for a in kinds] == [False, True, True,
                                                                                              False, True]
    assert [(a.rope.theta, a.rope.rotary_dim, a.rope.layer_type) for a in kinds[:2]] == [
        (5e6, 8, "full_attention"), (1e4, 12, "sliding_attention")]
    assert [a.window(i) for i, a in enumerate(kinds)] == [None, WINDOW, WINDOW, None, WINDOW]
    assert all((a.head_dim, a.value_head_dim, a.value_scale, a.qkv_bias, a.o_bias) == (24, 16, 0.707, True, False)
               for a in kinds)
    assert cfg.attention is kinds[0] and cfg.sparse_layers == (1, 2, 3, 4) and cfg.moe.n_shared_experts == 0
    r = cfg.moe.router
    assert (r.n_group, r.topk_group, r.float32_logits, r.num_experts, r.top_k) == (2, 1, True, 8, 2)
    assert cfg.kv_layer_pairs() is None and kv_sizing.kv_sliding_window(cfg) is None  # 2 full, 3 sliding
    caches, nbytes = make_kv_caches(cfg, None, 4, 2, torch.device("cpu"))
    assert [tuple(c.shape for c in layer) for layer in caches][:2] == [((5, 2, 1, 24), (5, 2, 1, 16)),
                                                                        ((5, 2, 2, 24), (5, 2, 2, 16))]
    per_token = (2 * 1 + 3 * 2) * (24 + 16) * 4  # float32 (the config's dtype, unset: float32)
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == per_token
    assert kv_sizing.kv_cache_bytes_per_block(cfg, 2) == per_token * 2 and nbytes == per_token * 2 * 5
    # Two full and two sliding layers would pair on shared tensors (gpt-oss's layout), but their shapes differ.
    even = ModelConfig.from_pretrained(_config_dir(
        tmp_path / "even", "mimo", num_hidden_layers=4, mlp_layer_types=["dense"] + ["sparse"] * 3,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"]))
    assert even.attention.kv_layer_pairs(4) == ((0, 1), (2, 3)) and even.kv_layer_pairs() is None


# The published config.json files (MiniMaxAI/MiniMax-M2 with its FP8 quantization_config; XiaomiMiMo/MiMo-V2-Flash
# in its original spelling: hybrid_layer_pattern, moe_layer_freq, swa_* fields, which transformers 5.24 does not
# read and whose values must agree with what it builds).
MINIMAX_M2 = {
    "architectures": ["MiniMaxM2ForCausalLM"], "model_type": "minimax_m2", "attn_type_list": [1] * 62,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 3072, "intermediate_size": 1536,
    "max_position_embeddings": 196608, "mtp_transformer_layers": 1, "num_attention_heads": 48,
    "num_experts_per_tok": 8, "num_hidden_layers": 62, "num_key_value_heads": 8, "num_local_experts": 256,
    "num_mtp_modules": 3, "qk_norm_type": "per_layer", "rms_norm_eps": 1e-06, "rope_theta": 5000000,
    "rotary_dim": 64, "scoring_func": "sigmoid", "shared_intermediate_size": 0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_mtp": True, "use_qk_norm": True, "use_routing_bias": True, "vocab_size": 200064,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "float8_e4m3fn", "quant_method": "fp8",
                            "weight_block_size": [128, 128],
                            "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]},
}
_PATTERN = [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(48)]
MIMO_V2_FLASH = {
    "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash", "vocab_size": 152576,
    "hidden_size": 4096, "num_hidden_layers": 48, "num_attention_heads": 64, "num_key_value_heads": 4,
    "head_dim": 192, "v_head_dim": 128, "swa_num_attention_heads": 64, "swa_num_key_value_heads": 8,
    "swa_head_dim": 192, "swa_v_head_dim": 128, "partial_rotary_factor": 0.334, "rope_theta": 5000000,
    "swa_rope_theta": 10000, "sliding_window": 128, "sliding_window_size": 128, "hybrid_layer_pattern": _PATTERN,
    "moe_layer_freq": [0] + [1] * 47, "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False,
    "intermediate_size": 16384, "n_routed_experts": 256, "num_experts_per_tok": 8, "moe_intermediate_size": 2048,
    "routed_scaling_factor": None, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "layernorm_epsilon": 1e-5, "attention_value_scale": 0.707, "max_position_embeddings": 262144,
    "num_nextn_predict_layers": 3, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}


def test_published_minimax_m2_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(MINIMAX_M2))
    cfg = ModelConfig.from_pretrained(str(tmp_path), max_model_len=4096)
    a, q = cfg.attention, cfg.quantization
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.rope.rotary_dim, a.rope.theta) == (48, 8, 128, 64, 5e6)
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size, cfg.dtype) == (256, 8, 1536, torch.bfloat16)
    assert q.method == "fp8" and q.block == (128, 128)
    assert q.is_quantized("model.layers.3.self_attn.q_proj") and q.is_quantized("model.layers.3.block_sparse_moe.experts")
    assert not q.is_quantized("model.layers.3.block_sparse_moe.gate") and not q.is_quantized("lm_head")
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == 62 * 2 * 8 * 128 * 2


def test_published_mimo_v2_flash_config_and_ropes(tmp_path):
    """The hub file reads as the 48-layer model (9 full layers of 4 kv heads, 39 sliding of 8 with sinks), and each
    kind's rope is transformers' MiMoV2FlashRotaryEmbedding's for that kind."""
    from transformers import AutoConfig
    from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashRotaryEmbedding

    from moelink.engine.models.rope import rope_inv_freq

    (tmp_path / "config.json").write_text(json.dumps(MIMO_V2_FLASH))
    cfg = ModelConfig.from_pretrained(str(tmp_path), max_model_len=4096)
    kinds = [cfg.attention_for(i) for i in range(48)]
    full = [i for i, a in enumerate(kinds) if not a.sinks]
    assert full == [i for i, p in enumerate(_PATTERN) if p == 0] and len(full) == 9
    assert {(a.num_kv_heads, a.rope.theta) for a in kinds} == {(4, 5e6), (8, 1e4)}
    assert {(a.head_dim, a.value_head_dim, a.rope.rotary_dim, a.sliding_window) for a in kinds} == {(192, 128, 64, 129)}
    assert cfg.sparse_layers == tuple(range(1, 48)) and cfg.quantization.method == "fp8"
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == (9 * 4 + 39 * 8) * (192 + 128) * 2
    hf = MiMoV2FlashRotaryEmbedding(AutoConfig.from_pretrained(str(tmp_path)))
    for a in (kinds[0], kinds[1]):
        inv_freq, factor = rope_inv_freq(a.rope, cfg.hf_config)
        assert factor == 1.0 and torch.equal(inv_freq, getattr(hf, f"{a.rope.layer_type}_inv_freq").float())


def _set(**fields):
    return lambda raw: raw.update(fields)


@pytest.mark.parametrize("name,edit,match", [
    ("minimax", _set(attn_type_list=[1, 0, 1]),
     r"config.json attn_type_list=\[1, 0, 1\] is not supported: allowed: 1 \(full attention\) for each of the "
     r"num_hidden_layers=3 layers"),
    ("minimax", _set(qk_norm_type="per_head"),
     r"qk_norm_type='per_head' is not supported for MiniMaxM2ForCausalLM .*: allowed: 'per_layer'\."),
    ("minimax", _set(routed_scaling_factor=2.5), r"routed_scaling_factor=2.5 is not supported"),
    ("mimo", _set(layer_types=["full_attention", "chunked_attention", "sliding_attention", "full_attention",
                               "sliding_attention"]),
     r"config.json layer_types=\['full_attention', 'chunked_attention', .*\] is not supported: allowed: one of "
     r"'sliding_attention', 'full_attention' for each of the num_hidden_layers=5 layers"),
    ("mimo", _set(hybrid_layer_pattern=[0, 0, 1, 0, 1]),
     r"hybrid_layer_pattern=\[0, 0, 1, 0, 1\] is not supported: allowed: \[0, 1, 1, 0, 1\] \(what layer_types"),
    ("mimo", _set(swa_num_key_value_heads=3), r"swa_num_key_value_heads=3 is not supported for MiMoV2FlashForCausalLM"),
    ("mimo", _set(add_full_attention_sink_bias=True), r"add_full_attention_sink_bias=True is not supported"),
    ("mimo", _set(swa_rope_theta=20000), r"swa_rope_theta=20000 is not supported"),
    ("mimo", _set(n_shared_experts=1), r"n_shared_experts=1 is not supported"),
])
def test_config_refusals(tmp_path, name, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, name, edit))


# -- routers --------------------------------------------------------------------------------------------------

def test_minimax_router_matches_transformers():
    """Sigmoid scores, top-k of scores + correction bias, unbiased weights renormalised: transformers'
    MiniMaxM2TopKRouter, in float32 and in float64 (the bias float32-representable, as moelink holds it)."""
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2TopKRouter

    from moelink.moe.router import make_router

    hf_cfg = m2_config("minimax", num_local_experts=7, num_experts_per_tok=3)
    # What the reader builds for MiniMax-M2 (test_minimax_config), over 7 experts.
    router = make_router(RouterConfig(7, 3, "sigmoid", "noaux_tc", 1, 1, norm_topk_prob=True))
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        hf = MiniMaxM2TopKRouter(hf_cfg).to(dtype)
        with torch.no_grad():
            hf.weight.copy_(torch.randn(hf.weight.shape, generator=gen))
        bias32 = torch.randn(7, generator=gen) * 0.5
        x = torch.randn(29, hf_cfg.hidden_size, generator=gen).to(dtype)
        _, want_w, want_ids = hf(x, bias32.to(dtype))
        w, ids = router(torch.nn.functional.linear(x, hf.weight), bias32)
        order, want_order = ids.argsort(-1), want_ids.argsort(-1)
        assert torch.equal(ids.gather(1, order), want_ids.gather(1, want_order))
        torch.testing.assert_close(w.gather(1, order), want_w.float().gather(1, want_order), rtol=1e-6, atol=0)


def test_mimo_router_matches_transformers():
    from transformers.models.mimo_v2_flash.modeling_mimo_v2_flash import MiMoV2FlashTopkRouter

    from moelink.moe.router import make_router

    hf_cfg = m2_config("mimo", n_routed_experts=12, n_group=3, topk_group=2, num_experts_per_tok=3,
                       routed_scaling_factor=2.0)
    hf = MiMoV2FlashTopkRouter(hf_cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(hf.weight.shape, generator=gen))
        hf.e_score_correction_bias.copy_(torch.randn(12, generator=gen) * 0.5)
    router = make_router(RouterConfig(12, 3, "sigmoid", "noaux_tc", 3, 2, True, 2.0, float32_logits=True))
    x = torch.randn(31, hf_cfg.hidden_size, generator=gen, dtype=torch.float64)
    _, want_w, want_ids = hf(x)
    w, ids = router(torch.nn.functional.linear(x.float(), hf.weight), hf.e_score_correction_bias)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(w, want_w, rtol=0, atol=0)


# -- loading ----------------------------------------------------------------------------------------------------

def test_mimo_mtp_tensors_are_left_unread(m2_path, tmp_path, caplog):
    """MiMo-V2-Flash ships its MTP layers as model.mtp.*: they load nowhere, named in one log line."""
    from safetensors.torch import load_file, save_file

    from moelink.engine.rank.loader import load_model
    from moelink.kernels.ops import ReferenceKernels

    src = m2_path("mimo")
    dst = tmp_path / "with_mtp"
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors["model.mtp.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4, dtype=torch.float64)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO):
        model = load_model(ModelConfig.from_pretrained(str(dst), dtype="float64"), ReferenceKernels(),
                           torch.device("cpu"))
    assert "1 tensors under model.mtp. not read" in caplog.text
    sinks = load_file(str(dst / "model.safetensors"))["model.layers.1.self_attn.attention_sink_bias"]
    assert torch.equal(model.layers[1].self_attn.sinks_N, sinks) and model.layers[0].self_attn.sinks_N is None


@pytest.mark.parametrize("name", ["minimax", "mimo"])
def test_transformers5_layout(tmp_path, name):
    """A checkpoint in transformers 5's own names (fused experts; MiniMax's router and bias under mlp., MiMo's
    sinks as self_attn.sinks) runs as the published layout does: transformers' tokens for two prompts."""
    path = save_m2_checkpoint(tmp_path, name, fused=True, num_hidden_layers=2, **(
        dict(layer_types=["full_attention", "sliding_attention"], mlp_layer_types=["dense", "sparse"])
        if name == "mimo" else {}))
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

NAMES = ["minimax", "mimo"]


def _prompts(name: str) -> list[list[int]]:
    return prompts(VOCAB, seed=sum(map(ord, name)), n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
@pytest.mark.parametrize("name", NAMES)
def test_greedy_parity_chunked_batched(m2_path, name):
    check_chunked_batched(m2_path(name), _prompts(name))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_greedy_parity_under_preemption(m2_path, name):
    check_under_preemption(m2_path(name), _prompts(name))  # the chunked test's prompts: transformers' outputs cached


@pytest.mark.slow
def test_mimo_prefix_cache_hit_parity(m2_path):
    """A 64-token cached prefix (10x the window): sliding and full layers read it from the one block table."""
    check_prefix_cache_parity(LLM, m2_path("mimo"), VOCAB, n=3, max_suffix=5)


# -- FP8 ------------------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_fp8_block_checkpoint(tmp_path, name):
    """The published FP8 layout (`moelink quantize-fp8`, 16 x 16 blocks; MiMo's 24-row full-layer k ends mid-block,
    so q / k / v stack with a gap) loads through the FP8 block path and gives the greedy tokens of transformers'
    float64 model on the dequantized weights with the W8A8 activation rounding where the engine applies it. The
    router, its correction bias, the norms and the sinks stay float."""
    from tests.helpers.fp8_checkpoints import check_fp8_gqa_block_parity

    check_fp8_gqa_block_parity(save_m2_checkpoint(tmp_path / "float", name), tmp_path, VOCAB)
