"""Cohere2-MoE (Cohere2MoeForCausalLM) against transformers 5.24's own model: config reading and its refusals,
greedy parity with transformers' `generate` in float64, token for token (1-150-token prompts together under a small
token budget, so prompts run as several prefill chunks and past the 12-key sliding windows; again under a KV pool
small enough to preempt; prefix-cache hits; RMSNorm in place of the LayerNorm, summed shared experts, sigmoid
routing, transformers 5's fused names), and prompt logprobs equal to transformers'. What the family adds: the
parallel decoder layer (the shared "parallel" residual kind, blocks/stream.ParallelLayer: x + attn(h) + moe(h),
h = norm(x)), Cohere's LayerNorm without bias, the interleaved rope on sliding layers beside global NoPE layers (the
dense prefix layer rotating: force_rope), logit_scale and the "average" shared-expert combination folded into
weights. Checkpoint: the family's tiny model (engine/models/cohere2_moe/tiny.py, drawn by save_drawn_preset: norms
and biases random), saved by transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.cohere2_moe.tiny import COHERE2_MOE

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_pool_free, assert_same, check_chunked_batched,
                                  check_preemption_then_prefix_hits, check_under_preemption, engine_greedy, hf_greedy,
                                  prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def cohere_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("cohere2_moe"), COHERE2_MOE)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(COHERE2_MOE, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """Layers 1, 2, 4 sliding (12 keys) with the interleaved rope, 3 global NoPE, 0 global but rotating (the dense
    prefix layer, force_rope); layers 1-4 routed, top-2 of 6 by logits with a softmax over the two, plus one shared
    MLP 16 wide; the LayerNorm's eps read from layer_norm_eps."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a = cfg.attention
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.rope.style, a.qkv_bias, a.o_bias) == (4, 2, 16, "interleaved",
                                                                                            True, True)
    assert [a.window(i) for i in range(5)] == [None, 12, 12, None, 12]
    assert [a.rotates(i) for i in range(5)] == [True, True, True, False, True]
    assert cfg.sparse_layers == (1, 2, 3, 4) and cfg.intermediate_size == 48 and cfg.moe_intermediate_size == 16
    assert cfg.moe.n_shared_experts == 1 and cfg.moe.shared_expert_intermediate_size == 16
    assert cfg.moe.router.topk_method == "topk_softmax" and cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings
    # prefix_dense_sliding_window_pattern != 1: the dense full-attention layer is NoPE too
    other = ModelConfig.from_pretrained(_config_dir(tmp_path / "p", prefix_dense_sliding_window_pattern=2))
    assert not other.attention.rotates(0)
    rms = ModelConfig.from_pretrained(_config_dir(tmp_path / "rms", rms_norm_eps=1e-6))
    assert rms.rms_norm_eps == 1e-6


@pytest.mark.parametrize("edit,match", [
    (set_fields(expert_selection_fn="relu"), r"config.json expert_selection_fn='relu' is not supported"),
    (set_fields(expert_selection_fn="sigmoid", norm_topk_prob=True), r"config.json norm_topk_prob=True is not "
                                                                     r"supported.*expert_selection_fn='sigmoid'"),
    (set_fields(shared_expert_combination_strategy="max"),
     r"config.json shared_expert_combination_strategy='max' is not supported"),
    (set_fields(logit_scale=0.0), r"config.json logit_scale=0.0 is not supported"),
    (set_fields(quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16], "fmt": "e4m3",
                                      "activation_scheme": "dynamic"}),
     r"config.json quantization_config='fp8' is not supported for Cohere2MoeForCausalLM"),
    (set_fields(mlp_layer_types=["dense"] * 5), r"config.json mlp_layer_types=.* is not supported"),
    (set_fields(prefix_dense_intermediate_size=None), r"config.json prefix_dense_intermediate_size=None is not "
                                                      r"supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit=edit))


def test_lora_is_refused(cohere_path):
    with pytest.raises(ValueError, match=r"enable_lora is not supported for Cohere2MoeForCausalLM yet: its "
                                         r"logit_scale"):
        LLM(cohere_path, dtype="float64", enable_lora=True)


def test_prompt_logprobs_equal_transformers(cohere_path):
    """A 40-token prompt in two prefill chunks, past the sliding window: its logprobs equal transformers'
    log-softmax of its (scaled) logits in float64 (transformers' rope and router softmax run in float32: 1e-5)."""
    prompt = prompts(VOCAB, seed=5, n=2, lo=40, hi=40)[0]
    llm = LLM(cohere_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=24, num_kv_blocks=32,
              block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(cohere_path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        want_LV = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    for p in range(1, len(prompt)):
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(want_LV[p - 1, prompt[p]].item(), abs=1e-5)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


def test_greedy_parity_short(cohere_path):
    """Three prompts (5-40 tokens) under a 16-token budget: chunked prefills and decode steps of a batch."""
    ps = prompts(VOCAB, seed=3, n=3, lo=5, hi=40)
    llm = LLM(cohere_path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=64,
              block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=8), hf_greedy(cohere_path, ps, max_new=8), ps)
    assert_pool_free(llm)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(cohere_path):
    check_chunked_batched(cohere_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(cohere_path):
    check_under_preemption(cohere_path, _prompts())


@pytest.mark.slow
def test_preemption_then_prefix_hits(cohere_path):
    check_preemption_then_prefix_hits(cohere_path, _prompts())


@pytest.mark.slow
def test_rms_norm_sum_sigmoid_fused_untied_parity(tmp_path):
    """RMSNorm (rms_norm_eps given), the shared MLP summed, sigmoid weights not renormalised, no attention biases,
    an LM head of its own, the experts in transformers 5's fused names."""
    path = save_preset(tmp_path, COHERE2_MOE, fused=True, rms_norm_eps=1e-6, shared_expert_combination_strategy="sum",
                       expert_selection_fn="sigmoid", norm_topk_prob=False, attention_bias=False,
                       tie_word_embeddings=False, prefix_dense_sliding_window_pattern=2)
    ps = prompts(VOCAB, seed=29, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


_TRITON_RUN = """
import json, sys
from moelink.engine import LLM, SamplingParams
llm = LLM(sys.argv[1], kernels="triton", skip_warmup=True, **json.loads(sys.argv[3]))
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_kernels_equal_reference_kernels_greedy(tmp_path):
    """Float32 on the Triton kernels (the interpreter on a CPU): the parallel layer's attention on sliding and NoPE
    layers, chunked prompts past the window, two sequences per step, decodes, give the reference kernels' tokens."""
    import json
    import os
    import sys

    from tests.helpers import zygote
    from tests.helpers.fast_interpreter import interpreter_env

    path = save_preset(tmp_path, COHERE2_MOE)
    ps = prompts(VOCAB, seed=7, n=2, lo=14, hi=24)
    engine = dict(dtype="float32", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=24, block_size=8)
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, path, json.dumps(ps), json.dumps(engine)], env=env,
                      capture_output=True, text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    llm = LLM(path, kernels="reference", **engine)
    assert_same(got, engine_greedy(llm, ps, max_new=4), ps)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default Cohere2MoeConfig (its layer_types from sliding_window_pattern 4: every fourth layer
    global NoPE; LayerNorm; 8 experts, top-2 softmax; logit_scale 0.0625) reads."""
    import transformers

    cfg = transformers.Cohere2MoeConfig(num_hidden_layers=8)
    cfg.architectures = ["Cohere2MoeForCausalLM"]
    m = ModelConfig.from_pretrained(config_dir(tmp_path, cfg))
    assert [m.attention.rotates(i) for i in range(8)] == [True, True, True, False] * 2
    assert m.attention.window(0) == 4096 and m.sparse_layers == tuple(range(8)) and m.rms_norm_eps == 1e-5
