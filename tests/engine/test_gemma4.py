"""Gemma 4's MoE text model (Gemma4ForCausalLM with enable_moe_block: google/gemma-4-26B-A4B; and the text model of
the published Gemma4ForConditionalGeneration, served text-only) against transformers 5.24's own model: config reading
and its refusals, and greedy parity with transformers' `generate` in float64, token for token: 1-150-token prompts
(sliding window 8: up to 18 windows) together under a small token budget (chunked prefill, batches of different
lengths), again under a KV pool small enough to preempt, prefix-cache hits, speculative verify steps, the layout
without attention_k_eq_v (sliding and full layers of one shape, their caches paired), and the multimodal checkpoint
served text-only; prompt logprobs through the final softcapping. What the family adds: q/k norms with weights and
the weightless v norm at softmax scale 1, full layers of twice the head width with one kv head whose values are
k_proj's and the proportional rope, a dense GELU-tanh MLP beside the routed experts in every layer (each behind norms
of its own), the router's weightless norm, scale and per-expert scale, the per-layer scalar, the embedding scale and
the final logit softcapping. Checkpoints: the family's tiny models (engine/models/gemma4/tiny.py), saved by
transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.gemma4.tiny import GEMMA4, GEMMA4_MULTIMODAL, save_gemma4

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of
from tests.helpers.parity import (MAX_NEW, assert_pool_free, assert_same, check_chunked_batched,
                                  check_prefix_cache_parity, check_under_preemption, engine_greedy, hf_greedy,
                                  prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def gemma4_path(tmp_path_factory) -> str:
    return save_gemma4(tmp_path_factory.mktemp("gemma4"), GEMMA4)


def _config_dir(tmp_path, edit=None, preset=GEMMA4, **overrides) -> str:
    return config_dir(tmp_path, config_of(preset, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """Sliding layers 0 and 2 (window 8, 2 kv heads of 16, the default rope at 10000); full layers 1 and 3 (1 kv head
    of 32 whose values are k_proj's, the proportional rope at 1e6 over the whole head); every layer: per-head q/k
    norms, the v norm, softmax scale 1; every layer routed: top-2 of 6 softmax renormalised, GELU-tanh."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    for i, a in enumerate(cfg.layer_attention):
        full = i % 2 == 1
        assert (a.num_heads, a.num_kv_heads, a.head_dim) == ((4, 1, 32) if full else (4, 2, 16))
        assert (a.qk_norm, a.v_norm, a.softmax_scale, a.value_from_key) == ("per_head", True, 1.0, full)
        assert a.window(i) == (None if full else 8)
        r = a.rope
        assert (r.rope_type, r.theta, r.rotary_dim, r.layer_type) == (
            ("proportional", 1e6, 32, "full_attention") if full else ("default", 1e4, 16, "sliding_attention"))
    assert cfg.attention is cfg.layer_attention[1] and cfg.kv_layer_pairs() is None
    assert cfg.sparse_layers == (0, 1, 2, 3) and (cfg.num_experts, cfg.top_k) == (6, 2) and cfg.norm_topk_prob
    m = cfg.moe
    assert (m.router.scoring_func, m.activation, m.dense_activation) == ("softmax", "gelu_tanh", "gelu_tanh")
    assert (cfg.moe_intermediate_size, cfg.intermediate_size, cfg.tie_word_embeddings) == (16, 48, True)


def test_config_multimodal_text_model(tmp_path):
    """The published wrapper reads as its text model, its tensors under model.language_model."""
    cfg = ModelConfig.from_pretrained(config_dir(tmp_path, config_of(GEMMA4_MULTIMODAL)))
    assert cfg.architecture == "Gemma4ForCausalLM" and cfg.text_weights_prefix == "model.language_model."
    assert cfg.layer_attention[1].value_from_key


@pytest.mark.parametrize("edit,match", [
    (set_fields(enable_moe_block=False), r"config.json enable_moe_block=False is not supported"),
    (set_fields(hidden_size_per_layer_input=8), r"config.json hidden_size_per_layer_input=8 is not supported"),
    (set_fields(num_kv_shared_layers=2), r"config.json num_kv_shared_layers=2 is not supported"),
    (set_fields(use_bidirectional_attention="all"), r"config.json use_bidirectional_attention='all' is not supported"),
    (set_fields(hidden_activation="gelu"), r"config.json hidden_activation='gelu' is not supported"),
    (set_fields(layer_types=["sliding_attention", "chunked_attention", "sliding_attention", "full_attention"]),
     r"config.json layer_types=\[.*'chunked_attention'.*\] is not supported"),
    (set_fields(top_k_experts=7), r"config.json top_k_experts=7 is not supported"),
    (set_fields(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
     r"config.json rope_parameters=.* is not supported"),
    (set_fields(quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16]}),
     r"config.json quantization_config=.* is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_transformers_26b_config_reads(tmp_path):
    """transformers' Gemma4TextConfig at the 26B-A4B's published sizes (128 experts, top-8, sliding layers of 256 and
    full layers of 512 with 2 kv heads) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "Gemma4TextConfig")(
        hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, global_head_dim=512, num_global_key_value_heads=2, attention_k_eq_v=True,
        enable_moe_block=True, num_experts=128, top_k_experts=8, hidden_size_per_layer_input=0,
        final_logit_softcapping=30.0, sliding_window=1024, max_position_embeddings=262144)
    cfg.architectures = ["Gemma4ForCausalLM"]
    got = ModelConfig.from_pretrained(config_dir(tmp_path, cfg))
    assert (got.num_experts, got.top_k, got.num_layers) == (128, 8, 30)
    full, sliding = got.layer_attention[5], got.layer_attention[0]
    assert (full.head_dim, full.num_kv_heads, sliding.head_dim, sliding.num_kv_heads) == (512, 2, 256, 8)
    assert full.rope.rope_type == "proportional" and sliding.window(0) == 1024 and full.window(5) is None


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(gemma4_path):
    check_chunked_batched(gemma4_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(gemma4_path):
    check_under_preemption(gemma4_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(gemma4_path):
    check_prefix_cache_parity(LLM, gemma4_path, VOCAB, n=3, max_suffix=5)


def test_prompt_logprobs_equal_transformers(gemma4_path):
    """A 40-token prompt (five sliding windows) in two prefill chunks: its logprobs equal transformers' log-softmax of
    its softcapped logits (1e-5: the engine reports float32 logprobs). The softcapping bends the logits, which greedy
    tokens cannot show (it keeps their order); the tiny model's logits do reach the cap's bend."""
    prompt = prompts(VOCAB, seed=5, n=2, lo=40, hi=40)[0]
    llm = LLM(gemma4_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=24, num_kv_blocks=32,
              block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gemma4_path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        logits_LV = hf(torch.tensor([prompt])).logits[0, :-1]
    assert logits_LV.abs().max() > 1.5  # tanh(x / 3) * 3 is x within 1e-3 only below ~0.2
    want_LV = torch.log_softmax(logits_LV, dim=-1)
    for p in range(1, len(prompt)):
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(want_LV[p - 1, prompt[p]].item(), abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.7, 0.0])
def test_speculative_verify_steps(gemma4_path, p_right):
    """Drafts right with probability 0.7, and always wrong: multi-token verify steps over the sliding and full layers
    (their rejected K/V left behind) give transformers' greedy tokens."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    ps = _prompts()[:6]
    want = hf_greedy(gemma4_path, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, p_right,
                                                 vocab=VOCAB, seed=4)}
    llm = LLM(gemma4_path, speculative_config=spec, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0
    assert (sd.num_accepted_tokens > 0) == (p_right > 0)
    assert_pool_free(llm)


@pytest.mark.slow
def test_separate_values_paired_caches(tmp_path):
    """attention_k_eq_v off (v_proj on every layer) with full layers of the sliding layers' shape: their caches pair
    (ModelConfig.kv_layer_pairs, the sliding group's own block table), no softcapping."""
    path = save_gemma4(tmp_path, GEMMA4, seed=3, attention_k_eq_v=False, global_head_dim=16,
                       num_global_key_value_heads=2, final_logit_softcapping=None)
    cfg = ModelConfig.from_pretrained(path)
    assert cfg.kv_layer_pairs() == ((1, 0), (3, 2)) and not cfg.layer_attention[1].value_from_key
    ps = prompts(VOCAB, seed=17, n=4, lo=2, hi=70)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


@pytest.mark.slow
def test_multimodal_checkpoint_served_text_only(tmp_path):
    """The published layout (Gemma4ForConditionalGeneration: the text model under model.language_model., a vision
    tower beside it, not read) gives the tokens of transformers' own multimodal model on text-only prompts."""
    import transformers

    path = save_gemma4(tmp_path, GEMMA4_MULTIMODAL, seed=5)
    ps = prompts(VOCAB, seed=41, n=3, lo=20, hi=70)
    model = transformers.Gemma4ForConditionalGeneration.from_pretrained(path, dtype=torch.float64,
                                                                 experts_implementation="eager").eval()
    want = []
    with torch.no_grad():
        for p in ps:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                                 min_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0)
            want.append(gen[0, len(p):].tolist())
    llm = LLM(path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), want, ps)


def test_lora_is_refused(gemma4_path):
    with pytest.raises(ValueError, match=r"enable_lora is not supported for Gemma4ForCausalLM yet: its attention and "
                                         r"MoE blocks are its own kinds"):
        LLM(gemma4_path, dtype="float64", enable_lora=True)
