"""Hunyuan Hy4 (HYV4ForCausalLM, transformers' hy_v4) against transformers 5.24's own model: config reading and its
refusals, and greedy parity in float64 with transformers' forward without a cache (DeepSeek Sparse Attention's
oracle: tests/engine/test_dsa_families.py says why), token for token: 1-150-token prompts chunked and batched, again
from the prefix cache, under preemption, and prefilled on one engine and decoded on another over TCP. What the family
adds, each a reusable option: MLA sinks (MLAConfig.sinks: the kernels' sinks_N) and the element-wise output gate
(output_gate_values), the indexer's rope on each head's last dims (IndexerConfig.rope_position "last") with its
LayerNorm at rms_norm_eps, independent hyper-connections (HyperConnectionConfig comb False; engine/models/hy_v4/
kinds.py's residual and head kinds), the clamped SwiGLU on the routed experts only. Each parity test fails with the
sinks dropped or the indexer's rope on the first dims (measured). FP8 (Hy4-preview-FP8's block-scaled format) against transformers on the dequantized weights. Checkpoint:
engine/models/hy_v4/tiny.py (4 layers: indexers full, full, shared, shared; index_topk 12). TP 2 and EP 2 in
tests/ep/test_tp_families.py; the sink kernels in tests/kernels/test_mla_sinks.py."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config import kv_sizing
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.dsa import LightningIndexer
from moelink.engine.models.hy_v4.tiny import tiny_config, tiny_model
from moelink.engine.tools.tiny_families import VOCAB, save_model

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy, hf_greedy_nocache, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def hy4_path(tmp_path_factory) -> str:
    cfg = tiny_config()
    return save_model(tiny_model(cfg, 0), tmp_path_factory.mktemp("hy4"), cfg, torch.float64)


def _prompts(n: int = 8) -> list[list[int]]:
    """n prompts of 1-150 tokens, the first 6 tokens long (within index_topk: its prefill alone is dense)."""
    ps = prompts(VOCAB, seed=57, n=n, hi=150)
    ps[0] = ps[1][:6]
    return ps


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    cfg = ModelConfig.from_pretrained(config_dir(tmp_path, tiny_config()), dtype="float64")
    a, ix, hc, m = cfg.attention, cfg.attention.indexer, cfg.hyper_connections, cfg.moe
    assert (a.kind, a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim) == (
        "mla", 16, 16, 8, 8, 12)
    assert a.rope.style == "neox" and a.softmax_scale == 16 ** -0.5
    assert a.sinks and a.output_gate and a.output_gate_values
    assert (ix.num_heads, ix.head_dim, ix.topk, ix.rope_dim, ix.rope_style, ix.rope_position, ix.k_norm_eps) == (
        16, 12, 12, 8, "neox", "last", 1e-5)
    assert [cfg.attention_for(i).indexer.shared for i in range(4)] == [False, False, True, True]
    assert (hc.hc_mult, hc.comb, hc.post_mult, hc.post_eps, hc.sinkhorn_iters, hc.mix_rows) == (4, False, 1.5, True,
                                                                                                  0, 8)
    assert cfg.sparse_layers == (1, 2, 3) and (cfg.num_experts, cfg.top_k, m.n_shared_experts) == (10, 3, 1)
    assert (m.activation, m.swiglu_limit, m.router.scoring_func, m.router.topk_method) == (
        "silu_clamp", 0.5, "sigmoid", "noaux_tc")
    assert m.router.norm_topk_prob and m.router.routed_scaling_factor == pytest.approx(2.827)
    # Per token: 4 latents (16 + 8 values) and the two full layers' 12-value index keys, float64.
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == (4 * 24 + 2 * 12) * 8


@pytest.mark.parametrize("edit,match", [
    (set_fields(swiglu_limit=0.0), r"swiglu_limit=0.0 is not supported"),
    (set_fields(layer_types=["indexed_attention"] * 3 + ["full_attention"]), r"layer_types=.* is not supported"),
    (set_fields(indexer_types=["shared", "full", "full", "full"]), r"indexer_types=.* is not supported"),
    (set_fields(mlp_layer_types=["dense", "moe", "sparse", "sparse"]), r"mlp_layer_types"),  # transformers' own
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (set_fields(hc_magnitude=0.0), r"hc_magnitude=0.0 is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(config_dir(tmp_path, tiny_config(), edit))


def test_shared_option_refusals():
    """The options Hy4 added to the shared configs refuse what they cannot mean, naming the field."""
    import dataclasses

    from moelink.engine.models.hyper_connections_config import HyperConnectionConfig
    from moelink.engine.models.dsa_config import IndexerConfig

    with pytest.raises(ValueError, match="rope_position='middle' is invalid"):
        IndexerConfig(4, 16, 8, 8, rope_position="middle")
    with pytest.raises(ValueError, match="k_norm_eps=0 is invalid"):
        IndexerConfig(4, 16, 8, 8, k_norm_eps=0)
    with pytest.raises(ValueError, match="hc_sinkhorn_iters=3 is not supported without a mixing matrix"):
        HyperConnectionConfig(4, 3, 1e-6, comb=False)
    cfg = ModelConfig.from_pretrained(config_dir_tmp(), dtype="float64")
    with pytest.raises(ValueError, match="output_gate_values=True is invalid without output_gate=True"):
        dataclasses.replace(cfg.attention, output_gate=False)


def config_dir_tmp() -> str:
    import tempfile
    from pathlib import Path

    return config_dir(Path(tempfile.mkdtemp()), tiny_config())


# -- parity ---------------------------------------------------------------------------------------------------

@pytest.mark.slow  # over 1 s: not in the quick loop
def test_greedy_parity_chunked_batched_and_prefix_cached(hy4_path, monkeypatch):
    """8 prompts of 1-150 tokens in chunks of a 48-token budget, batched (the first alone: a dense prefill), then
    again on the same engine with every full block from the prefix cache (latents and index keys): both equal
    transformers, and some steps attend sparsely."""
    ps = _prompts()
    sparse_steps = []
    real = LightningIndexer.forward
    monkeypatch.setattr(LightningIndexer, "forward", lambda self, *a: (
        lambda out: (sparse_steps.append(out is not None), out)[1])(real(self, *a)))
    want = hf_greedy_nocache(hy4_path, ps)
    llm = LLM(hy4_path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=48, num_kv_blocks=256, block_size=16,
              skip_warmup=True)
    got = engine_greedy(llm, ps[:1])
    assert sparse_steps[0] is False
    got += engine_greedy(llm, ps[1:])
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert any(sparse_steps)
    assert_same(got, want, ps)
    hits_before = llm.engine.stats().prefix_cache_hits
    again = engine_greedy(llm, ps)
    hits = llm.engine.stats().prefix_cache_hits - hits_before
    full_blocks = sum((len(p) - 1) // 16 * 16 for p in ps)
    assert hits >= full_blocks > 0, f"expected >= {full_blocks} prefix-cache hit tokens, got {hits}"
    assert_same(again, want, ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_under_preemption(hy4_path):
    ps = _prompts()  # the prompts (and so transformers' outputs) of the test above
    llm = LLM(hy4_path, dtype="float64", max_num_seqs=8, max_num_batched_tokens=64, num_kv_blocks=24, block_size=8,
              skip_warmup=True)
    got = engine_greedy(llm, ps)
    assert llm.engine.stats().num_preemptions_total > 0
    assert_same(got, hf_greedy_nocache(hy4_path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_transformers_own_names_load_the_same(hy4_path, tmp_path):
    """The checkpoint in transformers' module names (save_original_format=False: attn_hc.fn, gate_proj, sinks)
    gives the same tokens as the published names (hc_pre.hc_attn_layer.hc_fn, linear_gate, learnable_sink_param)."""
    from safetensors import safe_open

    cfg = tiny_config()
    own = save_model(tiny_model(cfg, 0), tmp_path / "own", cfg, torch.float64, fused=True)
    with safe_open(f"{own}/model.safetensors", framework="pt") as st:
        assert "model.layers.0.attn_hc.fn" in st.keys() and "model.layers.0.self_attn.sinks" in st.keys()
    with safe_open(f"{hy4_path}/model.safetensors", framework="pt") as st:
        assert "model.layers.0.hc_pre.hc_attn_layer.hc_fn" in st.keys()
    ps = _prompts(3)
    kw = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=64, block_size=16,
              skip_warmup=True)
    assert engine_greedy(LLM(own, **kw), ps, max_new=4) == engine_greedy(LLM(hy4_path, **kw), ps, max_new=4)


@pytest.mark.slow
def test_prefill_on_one_engine_decode_on_another(hy4_path):
    """PD over TCP: the latents and the full layers' index keys travel; the decode side's tokens equal one engine's."""
    from tests.helpers.kv_disagg import check_pd_transfer

    check_pd_transfer(hy4_path, prompts(VOCAB, seed=11, n=3, lo=20, hi=60))


@pytest.mark.slow
def test_fp8_checkpoint_equals_transformers_on_its_dequantized_weights(tmp_path):
    """Hy4-preview-FP8's format as moelink's tool writes it (16 x 16 blocks here; index_head_dim 16, so each index
    head's rope rows move within its block): every linear FP8 with its block scales, Tencent's linear_gate among them,
    the routed experts fused FP8 running the clamped SwiGLU in the kernels' gate-up epilogue; greedy equals
    transformers' forward without a cache on the dequantized weights, with the W8A8 activation rounding where the
    engine quantizes (tests/helpers/fp8_checkpoints.fake_quant_hf_model)."""
    from safetensors import safe_open

    from moelink.engine.tools.quantize_fp8 import quantize_checkpoint
    from moelink.kernels.fp8 import FP8_DTYPE
    from tests.helpers.fp8_checkpoints import BLOCK, dequantized_copy, fake_quant_hf_model
    from tests.helpers.parity import hf_greedy_nocache_with

    cfg = tiny_config(index_head_dim=16)
    dst = quantize_checkpoint(save_model(tiny_model(cfg), tmp_path / "src", cfg), tmp_path / "fp8", BLOCK)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as st:
        p = "model.layers.1."
        for name in ("self_attn.linear_gate.weight", "mlp.experts.gate_up_proj", "mlp.shared_experts.linear_gate.weight",
                     "self_attn.indexer.wq_b.weight"):
            assert st.get_tensor(p + name).dtype == FP8_DTYPE, name
    deq = dequantized_copy(str(dst), tmp_path / "deq")
    ps = prompts(VOCAB, seed=5, n=4, lo=5, hi=80)  # past index_topk: sparse steps
    got = engine_greedy(LLM(str(dst), dtype="float64", max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=64,
                            block_size=8, skip_warmup=True), ps, max_new=6)
    assert len({t for g in got for t in g}) > 5, "degenerate model"
    hf = fake_quant_hf_model(deq, BLOCK, lambda n: n.replace("self_attn.gate_proj", "self_attn.linear_gate"))
    assert_same(got, hf_greedy_nocache_with(hf, ps, 6), ps)


@pytest.mark.slow
def test_bf16_keeps_the_lm_head_in_float32(hy4_path):
    """transformers keeps Hy4's LM head in float32 (_keep_in_fp32_modules_strict): under bf16 the engine holds it in
    float32 too and its logits come from float32 hidden states, so greedy picks are not rounded to bf16 logits."""
    llm = LLM(hy4_path, dtype="bfloat16", max_num_seqs=2, max_num_batched_tokens=64, num_kv_blocks=32, block_size=16,
              skip_warmup=True)
    model = llm.engine.executor.worker.runner.model
    assert model.lm_head.dtype == torch.float32 and model.embed_tokens.dtype == torch.bfloat16
    h = torch.randn(3, model.cfg.hidden_size, dtype=torch.bfloat16)
    assert model.compute_logits(h).dtype == torch.float32
    assert len(engine_greedy(llm, _prompts(2), max_new=3)[1]) == 3
