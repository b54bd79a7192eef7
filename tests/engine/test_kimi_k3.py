"""Kimi K3 (KimiK3ForConditionalGeneration, served as its text model KimiK3ForCausalLM) against its oracle: config
reading and its refusals, and greedy parity in float64, token for token, with the reference continuations of
tests/fixtures/kimi_k3/reference.json (made by make_reference.py beside it, a plain float64 implementation of the
published model written from the peers' math: transformers has no Kimi K3) on the tiny checkpoint
(engine/models/kimi_k3/tiny.py, seed 0, as Moonshot publishes K3): prompts of 1-150 tokens together under a small
token budget (chunked prefill, batches), prefix-cache hits over a shared 64-token prefix, preemption with the same
prompts again resuming from KDA state checkpoints, speculative decoding rolling the KDA states back past rejected
drafts, prefill/decode over TCP, and the first step's top logprobs; the published config at full size, its MXFP4
experts, load_format dummy. What the family adds: the
block attention residuals ("attn_res"), the latent MoE ("latent_shared"), SiTU (kernels/situ.py), KDA's full-rank
output gate with the bounded forget gate and NoPE MLA's element-wise output gate (shared kinds' variants). Measured:
with any one of them undone (the residual mix uniform, the latent norm skipped, SiLU for SiTU) the first prompts
differ."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.kimi_delta_config import KimiDeltaConfig
from moelink.engine.models.kimi_k3.tiny import k3_config, k3_tensors, write_k3

from tests.helpers.parity import assert_pool_free, assert_same, engine_greedy

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

REFERENCE = json.loads((Path(__file__).parents[1] / "fixtures" / "kimi_k3" / "reference.json").read_text())
CASES = REFERENCE["cases"]
MAX_NEW = REFERENCE["max_new"]
REFERENCE_VOCAB = 400  # the tiny checkpoint's (engine/tools/tiny_families.VOCAB)


@pytest.fixture(scope="module")
def k3_path(tmp_path_factory) -> str:
    return write_k3(tmp_path_factory.mktemp("kimi_k3"), seed=0)


def _config_dir(tmp_path, **text_fields) -> str:
    (tmp_path / "config.json").write_text(json.dumps(k3_config(**text_fields)))
    return str(tmp_path)


def _want(cases) -> list[list[int]]:
    return [c["greedy"] for c in cases]


def test_checkpoint_is_the_references():
    """The tiny checkpoint's weights are those the reference was made on (else: rerun make_reference.py)."""
    w = k3_tensors(k3_config()["text_config"], seed=0)
    got = round(sum(float(v.abs().sum()) for _, v in sorted(w.items())), 6)
    assert math.isclose(got, REFERENCE["checksum"], rel_tol=1e-12), (got, REFERENCE["checksum"])


def test_config(tmp_path):
    """KDA on 0, 1, 3, 4 (full-rank output gate, bounded forget gate), NoPE MLA with the per-value gate on 2 and 5,
    a dense first layer, the latent MoE's routing, SiTU everywhere; the text model read from the wrapper."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    assert cfg.architecture == "KimiK3ForCausalLM" and cfg.text_weights_prefix == "language_model.model."
    kinds = [cfg.attention_for(i) for i in range(cfg.num_layers)]
    assert [a.kind for a in kinds] == ["kda", "kda", "mla", "kda", "kda", "mla"] and cfg.linear_layers == (0, 1, 3, 4)
    kda, mla = kinds[0], kinds[2]
    assert isinstance(kda, KimiDeltaConfig)
    assert (kda.forget_gate, kda.output_gate, kda.gate_lower_bound, kda.a_log_float32) == (
        "low_rank", "full", -5.0, True)
    assert not mla.rotary and mla.output_gate and mla.output_gate_values and mla.softmax_scale == 16 ** -0.5
    r, m = cfg.moe.router, cfg.moe
    assert (r.scoring_func, r.topk_method, r.n_group, r.norm_topk_prob, r.routed_scaling_factor) == (
        "sigmoid", "noaux_tc", 1, True, 2.5)
    assert cfg.sparse_layers == (1, 2, 3, 4, 5) and m.n_shared_experts == 2
    assert (m.activation, m.dense_activation, m.situ_beta, m.situ_linear_beta) == ("situ", "situ", 1.5, 0.75)


def _published(tmp_path, quantized: bool) -> str:
    """Moonshot's config.json of Kimi K3 as published (tests/fixtures/kimi_k3/config.json: full size, MXFP4 experts
    in compressed-tensors), or without its quantization_config (its bf16 form)."""
    raw = json.loads((Path(__file__).parents[1] / "fixtures" / "kimi_k3" / "config.json").read_text())
    if not quantized:
        raw["text_config"].pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def test_published_config_at_full_size(tmp_path):
    """The published config read at full size (what --load-format dummy builds from): 93 layers, 69 of KDA, 24 MLA
    ones whose latents are the KV cache (576 values a token each), 896 experts top-16 in a 3584-wide latent."""
    from moelink.engine.config import kv_sizing

    cfg = ModelConfig.from_pretrained(_published(tmp_path, quantized=False))
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_experts, cfg.top_k) == (93, 7168, 896, 16)
    assert len(cfg.linear_layers) == 69 and cfg.attention_for(3).kind == "mla" and cfg.attention_for(92).kind == "mla"
    assert cfg.sparse_layers == tuple(range(1, 93)) and cfg.intermediate_size == 33792
    assert kv_sizing.kv_cache_bytes_per_token(cfg) == 24 * 576 * 2  # bf16
    assert (cfg.moe.situ_beta, cfg.moe.situ_linear_beta, cfg.hf_config["routed_expert_hidden_size"]) == (
        4.0, 25.0, 3584)


def test_published_mxfp4_config_reads(tmp_path):
    """As published: the routed experts MXFP4 (compressed-tensors' ignore list keeps attention, shared experts, the
    dense MLP and the head float)."""
    q = ModelConfig.from_pretrained(_published(tmp_path, quantized=True)).quantization
    assert q.method == "mxfp4" and q.is_quantized("model.layers.7.block_sparse_moe.experts")
    assert not q.is_quantized("model.layers.7.self_attn.experts")  # an ignore pattern wins


@pytest.mark.parametrize("fields,match", [
    (dict(attn_res_block_size=0), r"attn_res_block_size=0 is not supported: allowed: a positive integer"),
    (dict(routed_expert_hidden_size=64),
     r"routed_expert_hidden_size=64 is not supported: allowed: at most hidden_size"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported for KimiK3ForCausalLM: allowed: 'situ', 'silu'"),
    (dict(mla_use_nope=False), r"mla_use_nope=False is not supported for Kimi K3"),
    (dict(moe_router_activation_func="softmax"), r"moe_router_activation_func='softmax' is not supported"),
    (dict(activation_situ_linear_beta=-1.0), r"activation_situ_linear_beta=-1.0 is not supported"),
])
def test_config_refusals(tmp_path, fields, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, **fields))


@pytest.mark.slow  # the engine on 12 prompts in float64
def test_greedy_parity_chunked_batched(k3_path):
    """1-150-token prompts together under a 24-token budget: chunked prefills over the KDA states and the
    attention-residual stream, batches of up to 6."""
    cases = CASES[:12]
    llm = LLM(k3_path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=256, block_size=8)
    ps = [c["prompt"] for c in cases]
    assert_same(engine_greedy(llm, ps, MAX_NEW), _want(cases), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_prefix_hits(k3_path):
    """Five prompts sharing a 64-token prefix: after the first, each hits it (its MLA latents and KDA states from
    the cache) and still equals the reference."""
    cases = CASES[12:]
    ps = [c["prompt"] for c in cases]
    llm = LLM(k3_path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=128, num_kv_blocks=128, block_size=16)
    first = engine_greedy(llm, ps[:1], MAX_NEW)
    hits_before = llm.engine.stats().prefix_cache_hits
    rest = engine_greedy(llm, ps[1:], MAX_NEW)
    assert llm.engine.stats().prefix_cache_hits - hits_before >= 64 * (len(ps) - 1)
    assert_same(first + rest, _want(cases), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_under_preemption_and_state_checkpoints(k3_path):
    """A pool small enough to preempt, then the same prompts again, resuming from state checkpoints (hits
    asserted): both passes equal the reference."""
    cases = CASES[:12]
    ps = [c["prompt"] for c in cases]
    llm = LLM(k3_path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=24, block_size=8,
              num_state_checkpoints=16)
    assert_same(engine_greedy(llm, ps, MAX_NEW), _want(cases), ps)
    assert llm.engine.stats().num_preemptions_total > 0
    hits_before = llm.engine.stats().prefix_cache_hits
    assert_same(engine_greedy(llm, ps, MAX_NEW), _want(cases), ps)
    assert llm.engine.stats().prefix_cache_hits > hits_before
    assert_pool_free(llm)


def test_first_step_logprobs(k3_path):
    """The first generated token's top-5 logprobs equal the reference logits' log-softmax (the engine returns
    logprobs from float32 arithmetic: to 1e-5; the tokens above are exact)."""
    import torch

    cases = CASES[:3]
    llm = LLM(k3_path, dtype="float64", num_kv_blocks=64, block_size=8)
    outs = llm.generate([c["prompt"] for c in cases], SamplingParams(temperature=0.0, max_tokens=1, logprobs=5),
                        use_tqdm=False)
    for case, out in zip(cases, outs):
        want = torch.tensor(case["first_logits"], dtype=torch.float64).log_softmax(-1)
        got = out.outputs[0].logprobs[0]
        assert len(got) >= 5
        for token, lp in got.items():
            assert abs(lp.logprob - float(want[token])) < 1e-5, (token, lp.logprob, float(want[token]))


@pytest.fixture(scope="module")
def k3_mxfp4_paths(tmp_path_factory) -> tuple[str, str]:
    """Kimi K3 as published (MXFP4 experts in compressed-tensors) and the same model in float64 with its experts'
    weights the MXFP4 values dequantized (kernels/mxfp4.py, checked against transformers' dequantization)."""
    import torch
    from safetensors.torch import load_file, save_file

    from moelink.engine.models.kimi_k3.tiny import ARCHS, write_published
    from moelink.kernels.mxfp4 import mxfp4_dequantize, mxfp4_quantize

    root = tmp_path_factory.mktemp("kimi_k3_mxfp4")
    float_dir = write_k3(root / "float", seed=1, overrides=ARCHS["kimi_k3"].format_fields["published"])
    write_published(float_dir, root / "published")
    tensors = load_file(str(Path(float_dir) / "model.safetensors"))
    for name, t in tensors.items():
        if ".experts." in name:
            tensors[name] = mxfp4_dequantize(*mxfp4_quantize(t), dtype=torch.float64)
    save_file(tensors, str(Path(float_dir) / "model.safetensors"))
    return str(root / "published"), float_dir


@pytest.mark.slow
def test_published_mxfp4_experts_equal_their_dequantized_values(k3_mxfp4_paths):
    """The published layout (per expert weight_packed / weight_scale, the latent of 32 one MXFP4 group) served
    token for token as the float model whose experts hold the same values (chunked prefill, batches)."""
    published, dequantized = k3_mxfp4_paths
    cfg = ModelConfig.from_pretrained(published)
    assert cfg.quantization.method == "mxfp4"
    assert cfg.quantization.is_quantized("model.layers.1.block_sparse_moe.experts")
    assert not cfg.quantization.is_quantized("model.layers.1.block_sparse_moe.shared_experts")
    ps = [c["prompt"] for c in CASES[:6]]
    kw = dict(dtype="float64", max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=256, block_size=8)
    want = engine_greedy(LLM(dequantized, **kw), ps, MAX_NEW)
    assert len({t for out in want for t in out}) > 10
    assert_same(engine_greedy(LLM(published, **kw), ps, MAX_NEW), want, ps)


@pytest.mark.parametrize("fmt", ["float", "published"])
def test_dummy_checkpoint_has_the_real_checkpoints_tensors_and_generates(tmp_path, fmt):
    """load_format="dummy" from config.json alone: the tensors it makes are those `moelink make-tiny-model --arch
    kimi_k3 [--format published]` writes (the text model's names, language_model. off), shape for shape, in the
    loader's dtypes (MXFP4 experts' packed values and E8M0 scales as bytes); and an engine generates from it."""
    import shutil

    import torch
    from safetensors import safe_open

    from moelink.engine.rank.dummy_weights import DummyCheckpoint
    from moelink.engine.tools.tiny_model import make_tiny_model

    path = make_tiny_model(tmp_path / "k3", "kimi_k3", format=None if fmt == "float" else fmt)
    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        real = {n.removeprefix("language_model."): (tuple(st.get_slice(n).get_shape()), st.get_slice(n).get_dtype())
                for n in st.keys()}
    cfg = ModelConfig.from_pretrained(str(path), "float32")
    dummy = DummyCheckpoint.for_model(cfg, torch.device("cpu")).specs
    assert sorted(dummy) == sorted(real)
    held = {"F32": {torch.float32}, "U8": {torch.uint8}}
    for name, (shape, dtype) in real.items():
        assert dummy[name].shape == shape and dummy[name].dtype in held[dtype], (name, dummy[name], shape, dtype)
    alone = tmp_path / "alone"
    alone.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(path / f, alone / f)
    with LLM(str(alone), dtype="float32", load_format="dummy", num_kv_blocks=32, block_size=8) as llm:
        out = llm.generate([[1, 2, 3], [4, 5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True),
                           use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 3 for o in out)


@pytest.mark.slow
def test_speculative_decoding_rolls_kda_states_back_past_rejected_drafts(k3_path):
    """Drafts right with probability 0.7 (the reference's tokens): the verifying sequences' KDA states take only
    their accepted tokens, the attention-residual stream is per token (nothing to roll back), so greedy outputs
    equal the reference."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    cases = CASES[:6]
    ps, want = [c["prompt"] for c in cases], _want(cases)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, 0.7,
                                                 vocab=REFERENCE_VOCAB, seed=4)}
    llm = LLM(k3_path, speculative_config=spec, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=96, block_size=8, num_state_checkpoints=8)
    assert_same(engine_greedy(llm, ps, MAX_NEW), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0 and sd.num_accepted_tokens > 0
    assert_pool_free(llm)


@pytest.mark.slow
def test_pd_transfer_equals_one_engine(k3_path):
    """The KDA layers' conv and recurrent states travel beside the MLA layers' latents (prefill on one engine,
    decode on another; prompts of 2 tokens, a one-token prompt moving nothing, up to its engines' 128 tokens)."""
    from tests.helpers.kv_disagg import check_pd_transfer

    check_pd_transfer(k3_path, [c["prompt"] for c in CASES[:12] if 2 <= len(c["prompt"]) <= 100][:4])
