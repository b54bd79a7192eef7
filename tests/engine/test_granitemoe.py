"""Granite-MoE (GraniteMoeForCausalLM: granite-3.0/3.1 MoE; GraniteMoeSharedForCausalLM) against transformers 5.24's
own models: config reading and its refusals, greedy parity with transformers' `generate` in float64, token for token
(1-150-token prompts together under a small token budget, again under a KV pool small enough to preempt,
prefix-cache hits, tied embeddings as published, transformers 5's own checkpoint names), and prompt logprobs equal to
transformers' (logits_scaling leaves greedy tokens as they are: only the logprobs see it). What the family adds: the
muP multipliers (embedding, residual and logits ones folded into the weights at load, engine/models/granitemoe/
kinds.py; attention_multiplier as GQAConfig.scale), experts read from Granite's fused names, top-k of the logits
then a softmax over the k, the Shared model's shared MLP. Checkpoints: the family's tiny models
(engine/models/granitemoe/tiny.py, drawn by save_drawn_preset), saved by transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.granitemoe.tiny import GRANITE, GRANITE_SHARED

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)

PRESETS = {"granitemoe": GRANITE, "granitemoeshared": GRANITE_SHARED}


@pytest.fixture(scope="module")
def granite_path(tmp_path_factory):
    paths: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in paths:
            paths[name] = save_preset(tmp_path_factory.mktemp(name), PRESETS[name])
        return paths[name]

    return get


def _config_dir(tmp_path, preset=GRANITE, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(preset, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """GQA 4 / 2 with softmax scale attention_multiplier; every layer routed, top-2 of the logits then a softmax over
    them; no shared MLP (the Shared model's: 24 wide)."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path / "a"))
    a, r = cfg.attention, cfg.moe.router
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.softmax_scale) == (4, 2, 16, None, 0.1)
    assert not a.qkv_bias and not a.o_bias and cfg.sparse_layers == (0, 1, 2)
    assert (r.scoring_func, r.topk_method, r.norm_topk_prob, cfg.num_experts, cfg.top_k) == (
        "softmax", "topk_softmax", True, 6, 2)
    assert cfg.moe.n_shared_experts == 0 and cfg.moe_intermediate_size == 16
    shared = ModelConfig.from_pretrained(_config_dir(tmp_path / "b", GRANITE_SHARED, attention_bias=True))
    assert (shared.moe.n_shared_experts, shared.moe.shared_expert_intermediate_size) == (1, 24)
    assert shared.attention.qkv_bias and shared.attention.o_bias
    assert ModelConfig.from_pretrained(_config_dir(tmp_path / "c", GRANITE_SHARED, shared_intermediate_size=0)
                                       ).moe.n_shared_experts == 0


@pytest.mark.parametrize("edit,match", [
    (set_fields(embedding_multiplier=0.0), r"config.json embedding_multiplier=0.0 is not supported: allowed: a finite "
                                           r"number > 0"),
    (set_fields(residual_multiplier=-0.5), r"config.json residual_multiplier=-0.5 is not supported"),
    (set_fields(logits_scaling=float("inf")), r"config.json logits_scaling=inf is not supported"),
    (set_fields(attention_multiplier=0.0), r"config.json attention_multiplier=0.0 is not supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (set_fields(quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16], "fmt": "e4m3",
                                     "activation_scheme": "dynamic"}),
     r"config.json quantization_config='fp8' is not supported for GraniteMoeForCausalLM"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit=edit))


@pytest.mark.parametrize("name", list(PRESETS))
def test_transformers5_layout(tmp_path, name):
    """A checkpoint in transformers 5's own names (block_sparse_moe.experts.gate_up_proj, router.weight) runs as the
    published one (input_linear, output_linear, router.layer) does: transformers' tokens for two prompts."""
    path = save_preset(tmp_path, PRESETS[name], fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


@pytest.mark.parametrize("name", list(PRESETS))
def test_prompt_logprobs_equal_transformers(granite_path, name):
    """The prompt's logprobs equal transformers' log-softmax of its logits (divided by logits_scaling) in float64."""
    path = granite_path(name)
    prompt = prompts(VOCAB, seed=5, n=2, lo=30, hi=30)[0]
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=24, num_kv_blocks=32, block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        want_LV = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    for p in range(1, len(prompt)):
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(want_LV[p - 1, prompt[p]].item(), abs=1e-6)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
@pytest.mark.parametrize("name", list(PRESETS))
def test_greedy_parity_chunked_batched(granite_path, name):
    check_chunked_batched(granite_path(name), _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(granite_path):
    check_under_preemption(granite_path("granitemoeshared"), _prompts())


@pytest.mark.slow
def test_prefix_cache_hit_parity(granite_path):
    check_prefix_cache_parity(LLM, granite_path("granitemoeshared"), VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_tied_embeddings_parity(tmp_path):
    """As published: the LM head is the embedding table, so the embedding multiplier folded into it is divided out
    of the final norm with logits_scaling."""
    path = save_preset(tmp_path, GRANITE_SHARED, tie_word_embeddings=True)
    ps = prompts(VOCAB, seed=29, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


@pytest.mark.parametrize("name", list(PRESETS))
def test_lora_is_refused(granite_path, name):
    """An adapter's delta on o_proj or a down projection would miss the residual multiplier folded into them."""
    with pytest.raises(ValueError, match=r"enable_lora is not supported for GraniteMoe(Shared)?ForCausalLM yet: its "
                                         r"muP multipliers are folded into the weights at load"):
        LLM(granite_path(name), dtype="float64", enable_lora=True)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default GraniteMoeConfig (Granite-MoE's (multipliers 1)) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "GraniteMoeConfig")()
    cfg.architectures = ["GraniteMoeForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "GraniteMoeForCausalLM"
