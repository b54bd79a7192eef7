"""DeepSeek-V4 (issue 45) from a checkpoint transformers saved (tests/helpers/dsv4_checkpoint.py: every attention
kind, compress rates 2 and 8, an indexer top-4, a window of 6, three hyper-connection streams, hash-routed layers with
a random table): the config as read, the routers against transformers' own modules, and greedy outputs equal to
transformers' token for token in float64 with chunked prefill and several sequences per step, under preemption, and
from prefix-cache hits (the paged entries and the window / compressor states checkpointed at block boundaries)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config import kv_sizing
from moelink.engine.config.model import ModelConfig

from tests.helpers.dsv4_checkpoint import CSA_RATE, HCA_RATE, VOCAB, dsv4_config, save_dsv4_checkpoint
from tests.helpers.parity import (assert_pool_free, assert_same, check_preemption_then_prefix_hits,
                                  check_prefix_cache_parity, engine_greedy, hf_greedy, prompts)


@pytest.fixture(scope="module")
def dsv4_path(tmp_path_factory) -> str:
    return save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4"))


def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=42, n=8, lo=1, hi=150)


def test_config_reads_layer_kinds_routing_and_cache_sizes(dsv4_path):
    cfg = ModelConfig.from_pretrained(dsv4_path, dtype="float64")
    kinds = [cfg.attention_for(i).layer_kind for i in range(cfg.num_layers)]
    assert kinds == ["sliding", "csa", "hca", "csa"]
    assert [cfg.attention_for(i).compress_rate for i in range(4)] == [0, CSA_RATE, HCA_RATE, CSA_RATE]
    assert cfg.hash_layers == (0, 1) and cfg.state_layers == (0, 1, 2, 3)
    assert cfg.moe.router.scoring_func == "sqrtsoftplus" and cfg.moe.activation == "silu_clamp"
    assert cfg.moe.swiglu_limit == 0.6 and cfg.moe.router.routed_scaling_factor == 1.5
    assert cfg.hyper_connections.hc_mult == 3 and cfg.hyper_connections.sinkhorn_iters == 6
    csa, hca = cfg.attention_for(1), cfg.attention_for(2)
    assert (csa.rope.theta, cfg.attention_for(0).rope.theta, csa.rope.rotary_dim) == (40000.0, 10000.0, 8)
    # paged per token of context, float64: CSA (16 entry + 8 index key) / 2, HCA 16 / 8, sliding 0
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == (12 + 2 + 12) * 8
    assert csa.cache_shapes(4, 8) == ((5, 4, 16), (5, 4, 8)) and hca.cache_shapes(4, 8) == ((5, 1, 16),)
    # per sequence: the window (6 x 16) and the compressor rows (CSA: 4 tokens x 64 + 4 x 32; HCA: 8 x 32)
    assert csa.state_bytes_per_sequence(torch.float64) == (6 * 16 + 4 * 64 + 4 * 32) * 8
    assert hca.state_bytes_per_sequence(torch.float64) == (6 * 16 + 8 * 32) * 8
    with pytest.raises(ValueError, match="block_size=12 .* multiple of every compress rate"):
        hca.cache_shapes(4, 12)


@pytest.mark.parametrize("field,value,match", [
    ("layer_types", ["sliding_attention", "mamba", "sliding_attention", "sliding_attention"], "layer_types"),
    ("scoring_func", "softmax", "scoring_func='softmax'"),
    ("num_key_value_heads", 2, "num_key_value_heads=2"),
    ("index_topk", 0, "index_topk=0 .*a positive integer"),
    ("o_groups", 3, "o_groups=3 .*a divisor of num_attention_heads=4"),
    # Issue 53: sizes bounded before anything is sized (or looped over) from them; before, 1e9 Sinkhorn iterations
    # hung the first step and the others raised allocation tracebacks.
    ("hc_sinkhorn_iters", 10**9,
     r"hc_sinkhorn_iters=1000000000 is not supported: allowed: a positive integer at most 1024"),
    ("hc_mult", 10**9, r"hc_mult=1000000000 is not supported: allowed: a positive integer at most 64"),
    ("index_topk", 10**9, r"index_topk=1000000000 is not supported: allowed: a positive integer at most 32768"),
    ("sliding_window", 10**12,
     r"sliding_window=1000000000000 is not supported: allowed: a positive integer at most 65536"),
    ("compress_rates", {"compressed_sparse_attention": 10**9, "heavily_compressed_attention": 8},
     r"compress_rates\.compressed_sparse_attention=1000000000 is not supported: allowed: a positive integer at most "
     r"4096"),
    ("compress_rates", {"compressed_sparse_attention": 2, "heavily_compressed_attention": 10**12},
     r"compress_rates\.heavily_compressed_attention=1000000000000 is not supported"),
])
def test_an_unsupported_field_is_refused_naming_it(dsv4_path, tmp_path, field, value, match):
    shutil.copytree(dsv4_path, tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    raw[field] = value
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(str(tmp_path / "m"))


def test_routers_equal_transformers_modules():
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HashRouter, DeepseekV4TopKRouter

    from moelink.moe.token_routers import HashRouter, SqrtSoftplusRouter

    cfg = dsv4_config()
    torch.manual_seed(0)
    x_TD = torch.randn(9, cfg.hidden_size, dtype=torch.float64)
    ids_T = torch.randint(0, VOCAB, (9,))
    top = DeepseekV4TopKRouter(cfg).double()
    top.weight.data.normal_()
    top.e_score_correction_bias.normal_(std=0.3)
    _, w_hf, i_hf = top(x_TD)
    w, i = SqrtSoftplusRouter(cfg.num_experts_per_tok, cfg.routed_scaling_factor)(
        x_TD @ top.weight.T, top.e_score_correction_bias, ids_T)
    order_hf, order = i_hf.sort(-1), i.sort(-1)
    assert torch.equal(order_hf.values, order.values)
    assert torch.allclose(w_hf.gather(1, order_hf.indices), w.gather(1, order.indices), rtol=0, atol=1e-14)
    hashed = DeepseekV4HashRouter(cfg).double()
    hashed.weight.data.normal_()
    hashed.tid2eid.copy_(torch.randint(0, cfg.n_routed_experts, hashed.tid2eid.shape))
    _, w_hf, i_hf = hashed(x_TD, ids_T)
    w, i = HashRouter(cfg.num_experts_per_tok, cfg.routed_scaling_factor)(x_TD @ hashed.weight.T, hashed.tid2eid,
                                                                           ids_T)
    assert torch.equal(i, i_hf) and torch.equal(i, hashed.tid2eid[ids_T])
    assert torch.allclose(w, w_hf, rtol=0, atol=1e-14)


@pytest.mark.slow
def test_published_tensor_names_load(dsv4_path, tmp_path):
    """The same weights under the names DeepSeek publishes (no `model.` prefix, embed.weight, hc_head_fn) give the
    same tokens."""
    from safetensors.torch import load_file, save_file

    from moelink.engine.models.deepseek_v4.blocks import published_name

    shutil.copytree(dsv4_path, tmp_path / "m")
    files = list((tmp_path / "m").glob("*.safetensors"))
    assert len(files) == 1
    tensors = load_file(str(files[0]))
    renamed = {published_name(n): t for n, t in tensors.items()}
    assert "embed.weight" in renamed and "hc_head_fn" in renamed and "layers.0.attn.wq_a.weight" in renamed
    files[0].unlink()
    (tmp_path / "m" / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(renamed, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    ps = _prompts()[:3]
    llm = LLM(str(tmp_path / "m"), dtype="float64", max_num_seqs=4, num_kv_blocks=96, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(dsv4_path, ps), ps)


@pytest.mark.slow
def test_greedy_parity_chunked_batched(dsv4_path):
    """Prompts of 1..150 tokens in chunks of a 48-token budget, four sequences a step, blocks of 8 (a multiple of
    both compress rates): every compression boundary, the window and the indexer's top-k crossed mid-chunk."""
    ps = _prompts()
    llm = LLM(dsv4_path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=160, block_size=8)
    got = engine_greedy(llm, ps)
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert_same(got, hf_greedy(dsv4_path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_under_preemption_and_prefix_hits(dsv4_path):
    """A pool small enough to preempt, then the same prompts again: they resume from state checkpoints at block
    boundaries and the paged entries before them (hits asserted), and still equal transformers."""
    check_preemption_then_prefix_hits(dsv4_path, _prompts())


@pytest.mark.slow
def test_prefix_cache_hit_equals_miss(dsv4_path):
    """Prompts sharing a 64-token prefix (blocks of 16): every one after the first hits it and equals transformers."""
    check_prefix_cache_parity(lambda *a, **kw: LLM(*a, num_state_checkpoints=8, **kw), dsv4_path, VOCAB, n=4,
                              max_suffix=20)


def test_kv_bytes_per_token_beside_deepseek_v3(tmp_path):
    """kv_sizing at full size, bf16, from transformers' default configs (V4: 43 layers, hidden 4096, 2 HCA then CSA /
    HCA interleaved, window 128; V3: 61 MLA layers). V4's paged cache per token of context is 20 CSA layers x
    (512 + 128) / 4 values + 23 HCA layers x 512 / 128 values = 3292 values, 6584 bytes, 10.7x less than V3's 70272
    (61 x 576 values); beside it each sequence holds its window (bf16) and compressor rows (float32) in a state slot:
    19.3 MB, the paged bytes of ~2900 tokens, constant in the context length."""
    from transformers import DeepseekV3Config, DeepseekV4Config

    sizes = {}
    for name, c in (("v4", DeepseekV4Config()), ("v3", DeepseekV3Config())):
        c.architectures = ["DeepseekV4ForCausalLM" if name == "v4" else "DeepseekV3ForCausalLM"]
        c.save_pretrained(tmp_path / name)
        cfg = ModelConfig.from_pretrained(str(tmp_path / name), dtype="bfloat16")
        sizes[name] = (kv_sizing.kv_cache_bytes_per_token(cfg), kv_sizing.state_bytes_per_sequence(cfg))
    assert sizes["v3"] == (61 * 576 * 2, 0)
    assert sizes["v4"][0] == (20 * 160 + 23 * 4) * 2 == 6584
    window, csa_rows, hca_rows = 128 * 512, 8 * 2048 + 8 * 512, 128 * 1024
    assert sizes["v4"][1] == 43 * window * 2 + (20 * csa_rows + 23 * hca_rows) * 4  # the rows in float32


def test_hyper_connection_equals_transformers_module():
    """The mixes (float32, Sinkhorn), the collapse and the expansion against DeepseekV4HyperConnection / HyperHead,
    on random weights far from their initial values."""
    from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4HyperConnection, DeepseekV4HyperHead

    from moelink.engine.models.hyper_connections_config import HyperConnectionConfig
    from moelink.engine.models.hyper_connections import HyperConnection, HyperHead

    cfg = dsv4_config()
    torch.manual_seed(1)
    hf, hf_head = DeepseekV4HyperConnection(cfg), DeepseekV4HyperHead(cfg)
    for p in list(hf.parameters()) + list(hf_head.parameters()):
        p.data.normal_()
    hc_cfg = HyperConnectionConfig(cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps)
    ours, head = HyperConnection(hc_cfg, cfg.hidden_size, cfg.rms_norm_eps), HyperHead(hc_cfg, cfg.hidden_size,
                                                                                          cfg.rms_norm_eps)
    ours.fn_MnD.copy_(hf.fn), ours.base_M.copy_(hf.base), ours.scale_3.copy_(hf.scale)
    head.fn_nnD.copy_(hf_head.hc_fn), head.base_n.copy_(hf_head.hc_base), head.scale_1.copy_(hf_head.hc_scale)
    x_TnD = torch.randn(5, cfg.hc_mult, cfg.hidden_size, dtype=torch.float64)
    out_TD = torch.randn(5, cfg.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        post, comb, collapsed = hf(x_TnD[None])
        want = post.double().unsqueeze(-1) * out_TD[None].unsqueeze(-2) + torch.matmul(comb.double().transpose(-1, -2),
                                                                                      x_TnD[None])
        got_collapsed, mix = ours.collapse(x_TnD)
        assert torch.equal(got_collapsed, collapsed[0])
        assert torch.equal(HyperConnection.expand(x_TnD, out_TD, mix), want[0])
        assert torch.equal(head(x_TnD), hf_head(x_TnD[None])[0])


@pytest.mark.parametrize("kw,match", [
    # fp8 runs as e4m3 with scales (tests/engine/test_dsv4_fp8_kv.py); e5m2 is refused naming what is allowed
    (dict(kv_cache_dtype="fp8_e5m2"), "kv_cache_dtype='fp8_e5m2' is invalid: choose from 'auto', 'fp8', 'fp8_e4m3'"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 4}),
     r"speculative_config.num_speculative_tokens=4 is invalid for DeepseekV4ForCausalLM: at most 3 .*smallest state "
     r"ring, 4 slots"),
    (dict(block_size=12), "block_size=12 is invalid for DeepSeek-V4"),
])
def test_what_v4_does_not_run_yet_is_refused_naming_it(dsv4_path, kw, match):
    with pytest.raises(ValueError, match=match):
        LLM(dsv4_path, **{**dict(dtype="float32", max_num_seqs=2, num_kv_blocks=16, block_size=8), **kw})


@pytest.mark.slow
def test_greedy_parity_with_yarn_on_the_compress_rope(tmp_path_factory):
    """V4 as published scales its compress rope with YaRN (attention factor forced to 1): the compressed layers, their
    compressors and indexer rotate with it, the sliding layer with the plain main rope."""
    path = save_dsv4_checkpoint(tmp_path_factory.mktemp("dsv4_yarn"), seed=3, rope_parameters=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=128, beta_fast=32, beta_slow=1))
    cfg = ModelConfig.from_pretrained(path, dtype="float64")
    assert cfg.attention_for(1).rope.rope_type == "yarn" and cfg.attention_for(0).rope.rope_type == "default"
    ps = prompts(VOCAB, seed=5, n=4, lo=1, hi=150)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=128, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


def test_float32_logits_equal_transformers_over_two_chunks(dsv4_path):
    """Logits, not only argmax: the model in float32 over a 150-token prompt in two chunks (the window and compressor
    rings and the paged entries carry over) against transformers' float32 forward without a cache."""
    from transformers import AutoModelForCausalLM

    from moelink.engine.models.layers import ForwardContext
    from moelink.engine.state.step import StateStep
    from moelink.engine.rank.kv_cache import make_kv_caches
    from moelink.engine.rank.loader import load_model
    from moelink.engine.state.cache import StateCaches
    from moelink.kernels.attention import AttentionMetadata
    from moelink.kernels.ops import ReferenceKernels

    seq = _prompts()[1]
    assert len(seq) == 150
    cpu = torch.device("cpu")
    cfg = ModelConfig.from_pretrained(dsv4_path, dtype="float32")
    model = load_model(cfg, ReferenceKernels(), cpu)
    paged, _ = make_kv_caches(cfg, None, 32, 8, cpu)
    states = StateCaches([cfg.attention_for(i) for i in range(cfg.num_layers)], 1, 0, cfg.dtype, cpu)
    caches = [tuple(paged[i]) + states.layers[i] for i in range(cfg.num_layers)]
    table = torch.arange(32, dtype=torch.int32)[None]
    logits = []
    for p0, p1 in ((0, 70), (70, 150)):
        T = p1 - p0
        meta = AttentionMetadata(torch.tensor([0, T], dtype=torch.int32), torch.tensor([p1], dtype=torch.int32), table,
                                 torch.arange(p0, p1), [T], [p1], T, p1, 32)
        step = StateStep(torch.tensor([0], dtype=torch.int32), torch.tensor([p0 > 0]), meta.query_start_loc_S1, False)
        with torch.no_grad():
            h = model(torch.tensor(seq[p0:p1]), torch.arange(p0, p1), ForwardContext(meta, caches, state=step))
            logits.append(model.compute_logits(h))
    hf = AutoModelForCausalLM.from_pretrained(dsv4_path, dtype=torch.float32, experts_implementation="eager").eval()
    with torch.no_grad():
        want = hf(torch.tensor([seq]), use_cache=False).logits[0]
    assert torch.allclose(torch.cat(logits), want, rtol=0, atol=2e-5)
