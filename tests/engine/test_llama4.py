"""Llama 4 (Llama4ForCausalLM, and the text model of the published Llama4ForConditionalGeneration: Scout, Maverick)
against transformers 5.24's own model: config reading and its refusals, and greedy parity with transformers'
`generate` in float64, token for token: 1-150-token prompts together under a small token budget (chunked prefill,
batches), again under a KV pool small enough to preempt, prefix-cache hits, Maverick's alternating dense and MoE
layers, a chunk of 8 read through blocks of 4 and 8, and the multimodal checkpoint served text-only. What the family
adds: chunked local attention on the rope layers (the prompts cross up to ten attention chunks of 16), NoPE layers with
attention temperature tuning, the weightless L2 q/k norm, the interleaved llama3-scaled rope, top-1 sigmoid routing
whose weight scales the expert's input, a shared expert, fused [E, D, 2F] experts. Checkpoints: the family's tiny
models (engine/models/llama4/tiny.py, drawn by save_drawn_preset), saved by transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.llama4.tiny import LLAMA4, LLAMA4_MAVERICK, LLAMA4_MULTIMODAL

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (MAX_NEW, assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def llama4_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("llama4"), LLAMA4)


def _config_dir(tmp_path, edit=None, preset=LLAMA4, **overrides) -> str:
    return config_dir(tmp_path, config_of(preset, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """Scout's layout: layers 0-2 rotate (interleaved llama3 rope), L2-normed q/k, attend within chunks of 16;
    layer 3 is NoPE with temperature tuning (floor_scale 8, attn_scale 0.5) over the whole context; every layer MoE:
    top-1 of 4 by a sigmoid that scales the expert's input, a shared expert 16 wide."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    rope_layers, nope = cfg.layer_attention[:3], cfg.layer_attention[3]
    for a in rope_layers:
        assert (a.qk_norm, a.attention_chunk_size, a.temperature_tuning) == ("l2", 16, None)
        assert (a.rope.style, a.rope.rope_type, a.rope.theta) == ("interleaved", "llama3", 500000.0)
        assert a.rotates(0) and not a.rotates(3)
    assert (nope.qk_norm, nope.attention_chunk_size, nope.temperature_tuning) == (None, None, (8.0, 0.5))
    a = cfg.attention
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qkv_bias, a.o_bias) == (4, 2, 16, False, False)
    m = cfg.moe
    assert cfg.sparse_layers == (0, 1, 2, 3) and (cfg.num_experts, cfg.top_k) == (4, 1)
    assert (m.router.scoring_func, m.router.topk_method, m.router.norm_topk_prob) == ("sigmoid", "topk_sigmoid", False)
    assert m.router_weight_on_input and (m.n_shared_experts, m.shared_expert_intermediate_size) == (1, 16)
    assert not m.shared_expert_gate and cfg.moe_intermediate_size == 16


def test_config_maverick(tmp_path):
    """Maverick's: MoE on the odd layers (interleave_moe_layer_step 2), dense layers intermediate_size_mlp wide, no
    q/k norm."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, preset=LLAMA4_MAVERICK))
    assert cfg.sparse_layers == (1, 3) and cfg.intermediate_size == 48 and cfg.moe_intermediate_size == 16
    assert all(a.qk_norm is None for a in cfg.layer_attention)


def test_config_multimodal_text_model(tmp_path):
    """The published wrapper reads as its text model, its tensors under language_model.model."""
    cfg = ModelConfig.from_pretrained(config_dir(tmp_path, config_of(LLAMA4_MULTIMODAL)))
    assert cfg.architecture == "Llama4ForCausalLM" and cfg.text_weights_prefix == "language_model.model."
    assert cfg.layer_attention[0].attention_chunk_size == 16


@pytest.mark.parametrize("edit,match", [
    (set_fields(num_experts_per_tok=2), r"config.json num_experts_per_tok=2 is not supported"),
    (set_fields(layer_types=["sliding_attention"] * 4), r"config.json layer_types=\[.*\] is not supported"),
    (set_fields(attention_chunk_size=0), r"config.json attention_chunk_size=0 is not supported"),
    (set_fields(no_rope_layers=[1, 1]), r"config.json no_rope_layers=\[1, 1\] is not supported"),
    (set_fields(floor_scale=0), r"config.json floor_scale=0 is not supported"),
    (set_fields(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}),
     r"rope_type.*='linear' is not supported: allowed: 'default', 'yarn', 'llama3'"),
    (set_fields(quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]}),
     r"config.json quantization_config='fp8' is not supported for Llama4ForCausalLM yet"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_llama3_rope_refused_elsewhere(tmp_path):
    """rope_type llama3 is Llama 4's (Architecture.rope_types): another family's reader still refuses it."""
    from moelink.engine.models.qwen2_moe.tiny import QWEN2_MOE

    edit = set_fields(rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 64})
    with pytest.raises(ValueError, match=r"rope_type.*='llama3' is not supported: allowed: 'default', 'yarn'\."):
        ModelConfig.from_pretrained(config_dir(tmp_path, config_of(QWEN2_MOE), edit))


def test_block_size_must_divide_the_chunk(llama4_path):
    with pytest.raises(ValueError, match=r"block_size=32 is invalid for this model: it must divide its "
                                         r"attention_chunk_size=16"):
        LLM(llama4_path, dtype="float64", num_kv_blocks=16, block_size=32)


def test_lora_is_refused(llama4_path):
    with pytest.raises(ValueError, match=r"enable_lora is not supported for Llama4ForCausalLM yet: its q/k rows"):
        LLM(llama4_path, dtype="float64", enable_lora=True)


def test_expert_parallel_rank_reads_its_rows(llama4_path):
    """An EP rank holding experts 2-3 reads those rows of the fused gate_up_proj / down_proj (transposed into
    moelink's stacks): its stacks equal the whole model's for those experts."""
    from moelink.engine.rank.loader import load_model
    from moelink.kernels.ops import ReferenceKernels
    from moelink.moe.layer import ExpertParallel
    from moelink.moe.placement import ExpertPlacement

    cfg = ModelConfig.from_pretrained(llama4_path, "float64")
    cpu = torch.device("cpu")
    whole = load_model(cfg, ReferenceKernels(), cpu)
    placement = ExpertPlacement(4, 2)
    rank = load_model(cfg, ReferenceKernels(), cpu, ExpertParallel(1, 2, placement, None, placement.to_tensors("cpu")))
    for a, b in zip(whole.layers, rank.layers):
        assert torch.equal(a.moe.w13_EFD[2:], b.moe.w13_EFD) and torch.equal(a.moe.w2_EDI[2:], b.moe.w2_EDI)


def test_router_matches_transformers():
    """TopKSigmoidRouter is transformers' Llama4Router: the top-k of the logits, each weighted by its sigmoid (in
    float32, cast back to the logits' dtype); here with logits whose float32 sigmoids tie at 1.0."""
    import transformers
    from transformers.models.llama4.modeling_llama4 import Llama4Router

    from moelink.moe.router import TopKSigmoidRouter

    hf = Llama4Router(transformers.Llama4TextConfig(hidden_size=8, num_local_experts=6, num_experts_per_tok=1))
    logits = torch.randn(32, 6, dtype=torch.float64) * 10
    logits[0] = torch.tensor([20.0, 30.0, 25.0, 0.0, 1.0, 2.0])  # sigmoids of 20, 30, 25 are 1.0 in float32
    with torch.no_grad():
        hf.weight.copy_(torch.eye(6, 8))
        scores, _ = hf.to(torch.float64)(torch.cat([logits, torch.zeros(32, 2, dtype=torch.float64)], dim=1))
    weights, ids = TopKSigmoidRouter(1)(logits)
    assert ids[0, 0] == 1
    assert torch.equal(scores.gather(1, ids), weights) and torch.equal(scores.argmax(-1), ids[:, 0])


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(llama4_path):
    check_chunked_batched(llama4_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(llama4_path):
    check_under_preemption(llama4_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(llama4_path):
    """A 64-token prefix (four attention chunks of 16, blocks of 16) hit by the later prompts."""
    check_prefix_cache_parity(LLM, llama4_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_the_chunks_matter(llama4_path, tmp_path):
    """The same weights attending over the whole context (attention_chunk_size large) give other tokens than the
    chunked model on these prompts: the parity above is a test of the chunk mask."""
    path = save_preset(tmp_path, LLAMA4, attention_chunk_size=4096)
    ps = prompts(VOCAB, seed=61, n=4, lo=60, hi=150)
    assert hf_greedy(path, ps) != hf_greedy(llama4_path, ps)


@pytest.mark.slow
@pytest.mark.parametrize("block_size", [4, 8])
def test_maverick_chunk_of_8_parity(tmp_path, block_size):
    """Maverick's layout with attention chunks of 8 read through blocks of 4 and 8 (a chunk two blocks, one), prompts
    of up to 90 tokens (eleven chunks), chunked prefill of 20 tokens a step."""
    path = save_preset(tmp_path, LLAMA4_MAVERICK, attention_chunk_size=8)
    ps = prompts(VOCAB, seed=23, n=6, lo=2, hi=90)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=20, num_kv_blocks=128,
              block_size=block_size)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


@pytest.mark.slow
def test_ngram_verify_steps_cross_chunks(llama4_path):
    """Prompt-lookup drafts, 3 a step: the verify rows (4 query tokens) split where they cross a chunk of 16, beside
    decode rows and prompt chunks; the tokens transformers computes, drafts accepted and rejected."""
    ps = prompts(VOCAB, seed=61, n=12, lo=1, hi=150)
    llm = LLM(llama4_path, dtype="float64", max_num_seqs=6, max_num_batched_tokens=24, num_kv_blocks=256, block_size=8,
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "prompt_lookup_max": 3})
    assert_same(engine_greedy(llm, ps), hf_greedy(llama4_path, ps), ps)
    sd = llm.engine.stats().spec_decode
    assert sd.num_draft_tokens > sd.num_accepted_tokens > 0, sd


@pytest.mark.slow
def test_multimodal_checkpoint_served_text_only(tmp_path):
    """The published layout (Llama4ForConditionalGeneration: the text model under language_model., a vision tower
    beside it, not read) gives the tokens of transformers' own multimodal model's text model, as it loaded it from
    that checkpoint (its own generate fails on a text-only prompt in transformers 5.24: it reads image_outputs from
    its language model's output)."""
    import transformers

    path = save_preset(tmp_path, LLAMA4_MULTIMODAL)
    ps = prompts(VOCAB, seed=41, n=3, lo=20, hi=70)
    model = transformers.Llama4ForConditionalGeneration.from_pretrained(path, dtype=torch.float64).eval().language_model
    want = []
    with torch.no_grad():
        for p in ps:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                                 min_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0)
            want.append(gen[0, len(p):].tolist())
    llm = LLM(path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), want, ps)


def test_transformers_default_configs_read(tmp_path):
    """transformers' default Llama4TextConfig (Scout's sizes: 16 experts, top-1, chunks of 8192) and Llama4Config
    (the multimodal wrapper) read without a refusal."""
    import transformers

    cfg = getattr(transformers, "Llama4TextConfig")()
    cfg.architectures = ["Llama4ForCausalLM"]
    got = ModelConfig.from_pretrained(config_dir(tmp_path / "text", cfg))
    assert got.layer_attention[0].attention_chunk_size == 8192 and got.num_experts == 16
    wrapper = getattr(transformers, "Llama4Config")()
    wrapper.architectures = ["Llama4ForConditionalGeneration"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path / "mm", wrapper)).architecture == "Llama4ForCausalLM"


# The published Llama-4-Scout-17B-16E's config.json (its text_config as Meta writes it: attn_temperature_tuning 4,
# cache_implementation, for_llm_compressor, the older rope_scaling), the vision_config abridged.
_SCOUT_TEXT = {
    "attention_bias": False, "attention_chunk_size": 8192, "attention_dropout": 0.0, "attn_scale": 0.1,
    "attn_temperature_tuning": 4, "bos_token_id": 200000, "cache_implementation": "hybrid",
    "eos_token_id": [200001, 200007, 200008], "floor_scale": 8192, "for_llm_compressor": False, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "interleave_moe_layer_step": 1,
    "intermediate_size": 8192, "intermediate_size_mlp": 16384, "max_position_embeddings": 10485760,
    "model_type": "llama4_text", "moe_layers": list(range(48)), "no_rope_layers": [int((i + 1) % 4 != 0)
                                                                                   for i in range(48)],
    "num_attention_heads": 40, "num_experts_per_tok": 1, "num_hidden_layers": 48, "num_key_value_heads": 8,
    "num_local_experts": 16, "output_router_logits": False, "pad_token_id": 200018, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "torch_dtype": "bfloat16",
    "use_cache": True, "use_qk_norm": True, "vocab_size": 202048}


@pytest.mark.parametrize("wrapped", [True, False], ids=["published", "text-only"])
def test_published_scout_config_reads(tmp_path, wrapped):
    """Meta's file reads (its attn_temperature_tuning 4 as true, which transformers 5.24's strict config would refuse):
    48 layers, every fourth NoPE with the temperature, the others in chunks of 8192 with the L2 q/k norm and llama3
    rope; 16 experts, top-1, a shared expert."""
    import json

    raw = ({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "text_config": _SCOUT_TEXT,
            "vision_config": {"model_type": "llama4_vision_model"}, "tie_word_embeddings": False} if wrapped
           else dict(_SCOUT_TEXT, architectures=["Llama4ForCausalLM"]))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_pretrained(str(tmp_path), max_model_len=8192)
    assert cfg.architecture == "Llama4ForCausalLM" and cfg.dtype == torch.bfloat16
    assert cfg.text_weights_prefix == ("language_model.model." if wrapped else "")
    nope = [i for i, a in enumerate(cfg.layer_attention) if not a.rotates(i)]
    assert nope == list(range(3, 48, 4))
    assert all(cfg.layer_attention[i].temperature_tuning == (8192.0, 0.1) for i in nope)
    a = cfg.layer_attention[0]
    assert (a.attention_chunk_size, a.qk_norm, a.rope.rope_type, a.temperature_tuning) == (8192, "l2", "llama3", None)
    assert (cfg.num_experts, cfg.top_k, cfg.sparse_layers, cfg.moe.shared_expert_intermediate_size) == (
        16, 1, tuple(range(48)), 8192)
