"""gpt-oss (GptOssForCausalLM) in bf16 / float checkpoints saved by transformers: config reading, the router
and experts against transformers' own modules, and greedy parity with transformers' `generate` in float64,
token for token, with prompts longer than the 6-token sliding window, non-zero sinks, chunked prefill (a
chunk's window starting mid-context), a prefix-cache hit and preemption. Checkpoints:
tests.helpers.gpt_oss_checkpoints.
"""
from __future__ import annotations

import json

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig

from tests.helpers.gpt_oss_checkpoints import VOCAB, WINDOW, gpt_oss_config, save_gpt_oss
from tests.helpers.parity import (assert_pool_free, assert_same, check_prefix_cache_parity, engine_greedy,
                                  hf_greedy, prompts)


@pytest.fixture(scope="module")
def gpt_oss_path(tmp_path_factory):
    return save_gpt_oss(tmp_path_factory.mktemp("gpt_oss"))


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    gpt_oss_config(**overrides).save_pretrained(tmp_path)
    if edit is not None:
        raw = json.loads((tmp_path / "config.json").read_text())
        edit(raw)
        (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def test_config_reader(tmp_path):
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, num_hidden_layers=4))
    a = cfg.attention
    assert (a.kind, a.num_heads, a.num_kv_heads, a.head_dim) == ("gqa", 4, 2, 16)
    assert a.qkv_bias and a.o_bias and a.sinks
    assert a.sliding_layers == (0, 2) and [a.window(i) for i in range(4)] == [WINDOW, None, WINDOW, None]
    assert (a.rope.rope_type, a.rope.style, a.rope.rotary_dim) == ("yarn", "neox", 16)
    m = cfg.moe
    assert m.router.topk_method == "topk_softmax" and m.router_bias and m.expert_bias
    assert (m.activation, m.swiglu_alpha, m.swiglu_limit) == ("swiglu_oai", 1.702, 0.6)
    assert cfg.sparse_layers == (0, 1, 2, 3) and cfg.moe_intermediate_size == 24 and cfg.num_experts == 5


def test_config_without_attention_bias_or_sliding_layers(tmp_path):
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, attention_bias=False, sliding_window=None,
                                                  layer_types=["full_attention"] * 3))
    assert not cfg.attention.qkv_bias and not cfg.attention.o_bias
    assert cfg.attention.sliding_window is None and cfg.attention.window(0) is None


@pytest.mark.parametrize("edit,match", [
    (lambda r: r.update(layer_types=["sliding_attention", "full_attention"]),  # transformers' own check
     r"(?s)transformers could not read config.json: .*num_hidden_layers.*layer_types"),
    (lambda r: r.update(layer_types=["chunked_attention"] * 3),
     r"layer_types=\['chunked_attention', .*\] is not supported: allowed: one of 'sliding_attention', "
     r"'full_attention' for each of the num_hidden_layers=3 layers"),
    (lambda r: r.update(sliding_window=None),
     r"sliding_window=None is not supported: allowed: a positive integer \(layer_types has sliding_attention"),
    (lambda r: r.update(swiglu_limit=0.0), r"config.json swiglu_limit=0.0 is not supported: allowed: a number > 0"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_router_matches_transformers():
    """Top-k of the biased logits, softmax over the k: transformers' GptOssTopKRouter, in its dtype."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    from moelink.moe.router import RouterConfig, make_router

    hf_cfg = gpt_oss_config(num_local_experts=7, num_experts_per_tok=3)
    router = make_router(RouterConfig(7, 3, topk_method="topk_softmax", norm_topk_prob=True))
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        hf = GptOssTopKRouter(hf_cfg).to(dtype)
        with torch.no_grad():
            hf.weight.copy_(torch.randn(hf.weight.shape, generator=gen))
            hf.bias.copy_(torch.randn(hf.bias.shape, generator=gen))
        x = torch.randn(11, hf_cfg.hidden_size, generator=gen).to(dtype)
        _, want_w, want_ids = hf(x)
        w, ids = router(torch.nn.functional.linear(x, hf.weight, hf.bias))
        assert torch.equal(ids, want_ids)
        assert w.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(w, want_w.to(w.dtype), rtol=0, atol=0)


def test_moe_block_matches_transformers(gpt_oss_path):
    """One loaded MoE layer (router + biases + de-interleaved, transposed experts + clamped SwiGLU) against
    transformers' GptOssMLP of the same checkpoint, in float64, on activations large enough to clamp."""
    from transformers import AutoModelForCausalLM

    from moelink.engine.rank.loader import load_model
    from moelink.kernels.ops import ReferenceKernels

    cfg = ModelConfig.from_pretrained(gpt_oss_path, dtype="float64")
    ours = load_model(cfg, ReferenceKernels(), torch.device("cpu"))
    hf = AutoModelForCausalLM.from_pretrained(gpt_oss_path, dtype=torch.float64, experts_implementation="eager")
    x = torch.randn(13, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 3
    for i in range(cfg.num_layers):
        want, _ = hf.model.layers[i].mlp(x[None])
        torch.testing.assert_close(ours.layers[i].mlp(x), want[0], rtol=1e-12, atol=1e-12)
        sinks = hf.model.layers[i].self_attn.sinks
        assert torch.equal(ours.layers[i].self_attn.sinks_N, sinks) and sinks.abs().min() > 0


def _prompts(n=6, hi=40):
    return prompts(VOCAB, seed=7, n=n, lo=1, hi=hi)


def test_greedy_parity_smoke(gpt_oss_path):
    """The quick loop's check: a 15-token prompt (over two windows) in 8-token chunks, then decodes."""
    ps = [_prompts(n=3, hi=20)[2][:15]]
    llm = LLM(gpt_oss_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=8, num_kv_blocks=32,
              block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(gpt_oss_path, ps, max_new=4), ps)
    assert_pool_free(llm)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_past_the_window(gpt_oss_path):
    """Prompts of 1-40 tokens (window 6) in 16-token steps over 4-token blocks: chunks whose window starts
    mid-context, mixed with decodes, equal transformers token for token."""
    ps = _prompts()
    llm = LLM(gpt_oss_path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=96,
              block_size=4)
    got = engine_greedy(llm, ps)
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert_same(got, hf_greedy(gpt_oss_path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_under_preemption(gpt_oss_path):
    ps = _prompts()  # the chunked test's: transformers' outputs are cached
    # 16 blocks of 4 hold one 40-token prompt and its 10 new tokens, and little more: six sequences preempt.
    llm = LLM(gpt_oss_path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=32, num_kv_blocks=16,
              block_size=4)
    got = engine_greedy(llm, ps)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_same(got, hf_greedy(gpt_oss_path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_prefix_cache_hit_parity(gpt_oss_path):
    """A 64-token cached prefix (10x the window): the new chunk's window lies inside the cached blocks."""
    check_prefix_cache_parity(LLM, gpt_oss_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_window_and_sinks_matter(gpt_oss_path):
    """The parity above is not blind to them: transformers' own last-token logits of the longer test prompts
    change when the window is lifted or the sinks are zeroed."""
    from transformers import AutoModelForCausalLM

    ps = [p for p in _prompts() if len(p) > 2 * WINDOW][:3]
    model = AutoModelForCausalLM.from_pretrained(gpt_oss_path, dtype=torch.float64, experts_implementation="eager")

    def logits():
        with torch.no_grad():
            return torch.stack([model(torch.tensor([p]), use_cache=False).logits[0, -1] for p in ps])

    want = logits()
    model.config.sliding_window = 4096  # the sliding layers' mask reads it
    assert not torch.allclose(logits(), want, atol=1e-3)
    model.config.sliding_window = WINDOW
    torch.testing.assert_close(logits(), want, rtol=0, atol=0)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.zero_()
    assert not torch.allclose(logits(), want, atol=1e-3)


@pytest.mark.slow
def test_bf16_checkpoint(tmp_path):
    """A bf16 checkpoint (what transformers writes for gpt-oss in bf16) reads as bf16 by default, and in
    float64 it runs token for token as transformers does on the same file."""
    path = save_gpt_oss(tmp_path, dtype=torch.bfloat16)
    assert ModelConfig.from_pretrained(path).dtype == torch.bfloat16
    ps = _prompts(n=2, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)
    bf16 = LLM(path, max_num_seqs=4, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    out = engine_greedy(bf16, ps, max_new=4)
    assert all(len(o) == 4 and all(0 <= t < VOCAB for t in o) for o in out)


# gpt-oss-20b's config.json in bf16 form (the published one plus quantization_config, which is MXFP4's business):
# the older rope_scaling / rope_theta spelling, fields transformers does not define (experts_per_token,
# initial_context_length), 24 alternating layer types.
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
    "initial_context_length": 4096, "initializer_range": 0.02, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
    "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 201088,
}


def test_gpt_oss_20b_config_and_rope(tmp_path):
    """The real model's config reads as the 20b shape, and the YaRN table (factor 32, truncate false) is
    transformers' GptOssRotaryEmbedding's: same inverse frequencies and attention factor."""
    from transformers import AutoConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from moelink.engine.models.rope import rope_inv_freq

    (tmp_path / "config.json").write_text(json.dumps(GPT_OSS_20B))
    cfg = ModelConfig.from_pretrained(str(tmp_path), max_model_len=8192)
    a = cfg.attention
    assert cfg.dtype == torch.bfloat16 and cfg.eos_token_ids == (200002,)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.sliding_window) == (64, 8, 64, 128)
    assert a.sliding_layers == tuple(range(0, 24, 2)) and a.qkv_bias and a.o_bias and a.sinks
    assert (cfg.num_experts, cfg.top_k, cfg.moe_intermediate_size) == (32, 4, 2880)
    assert (cfg.moe.swiglu_alpha, cfg.moe.swiglu_limit) == (1.702, 7.0)
    inv_freq, factor = rope_inv_freq(a.rope, cfg.hf_config)
    hf = GptOssRotaryEmbedding(AutoConfig.from_pretrained(str(tmp_path)))
    assert a.rope.rope_type == "yarn" and factor == hf.attention_scaling != 1.0
    assert torch.equal(inv_freq, hf.inv_freq.float())
