"""LFM2-MoE (Lfm2MoeForCausalLM, LiquidAI LFM2-8B-A1B) against transformers 5.24's own model: config reading and its
refusals, greedy parity with transformers' `generate` in float64, token for token (1-150-token prompts together
under a small token budget, so prompts run as several prefill chunks whose short-conv states carry chunk to chunk;
again under a KV pool small enough to preempt, the states recomputed; prefix-cache hits resuming from state
checkpoints; speculative verify steps whose rejected drafts are replayed out of the conv states; the checkpoint in
transformers 5's fused names), and prompt logprobs equal to transformers'. What the family adds: the shared
"short_conv" kind (engine/models/short_conv.py: in_proj -> B, C, x; C * causal_conv(B * x); out_proj, with biases)
beside GQA layers with q/k norms, a dense first layer, then sigmoid-routed experts selected with an expert bias,
renormalised and scaled. Checkpoint: the family's tiny model (engine/models/lfm2_moe/tiny.py, drawn by
save_drawn_preset: norms, biases and the expert bias random), saved by transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.lfm2_moe.tiny import LFM2_MOE
from moelink.engine.models.short_conv_config import ShortConvConfig

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_pool_free, assert_same, check_chunked_batched,
                                  check_preemption_then_prefix_hits, check_under_preemption, engine_greedy, hf_greedy,
                                  prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def lfm_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("lfm2_moe"), LFM2_MOE)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(LFM2_MOE, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """Layers 0, 2, 3 short convs (their conv states in the state pools), 1 and 4 GQA 4 / 2 with q/k norms; layer 0
    dense, 1-4 routed: sigmoid scores selected with the expert bias, renormalised, times 1.5."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    m = cfg.attention_for(0)
    assert isinstance(m, ShortConvConfig) and cfg.state_layers == (0, 2, 3)
    assert (m.channels, m.conv_kernel, m.bias) == (64, 3, True)
    a = cfg.attention_for(1)
    assert (a.kind, a.num_heads, a.num_kv_heads, a.qk_norm, a.rotates(1)) == ("gqa", 4, 2, "per_head", True)
    assert cfg.sparse_layers == (1, 2, 3, 4) and cfg.rms_norm_eps == 1e-5 and cfg.tie_word_embeddings
    r = cfg.moe.router
    assert (r.scoring_func, r.topk_method, r.norm_topk_prob, r.routed_scaling_factor) == ("sigmoid", "noaux_tc", True,
                                                                                          1.5)
    # Its state counts in the KV sizer: [2, 64] in the model dtype.
    assert m.state_bytes_per_sequence(torch.bfloat16) == 2 * 64 * 2


@pytest.mark.parametrize("edit,match", [
    (set_fields(layer_types=["conv"] * 5), r"config.json layer_types=.* is not supported: allowed: at least one "
                                           r"'full_attention'"),
    (set_fields(layer_types=["conv", "sliding_attention", "conv", "conv", "full_attention"]),
     r"config.json layer_types=.* is not supported"),
    (set_fields(num_dense_layers=5), r"config.json num_dense_layers=5 is not supported"),
    (set_fields(conv_L_cache=1), r"config.json conv_L_cache=1 is invalid"),
    (set_fields(num_experts=0), r"config.json num_experts=0 is not supported"),
    (set_fields(quantization_config={"quant_method": "fp8", "weight_block_size": [16, 16], "fmt": "e4m3",
                                      "activation_scheme": "dynamic"}),
     r"config.json quantization_config='fp8' is not supported for Lfm2MoeForCausalLM"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit=edit))


def test_tensor_parallel_is_refused(lfm_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .* is not supported for Lfm2MoeForCausalLM: its "
                                         r"short-conv layers are not sharded yet"):
        LLM(lfm_path, dtype="float64", tensor_parallel_size=2)


def test_prompt_logprobs_equal_transformers(lfm_path):
    """A 40-token prompt in two prefill chunks: its logprobs equal transformers' log-softmax of its logits."""
    prompt = prompts(VOCAB, seed=5, n=2, lo=40, hi=40)[0]
    llm = LLM(lfm_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=24, num_kv_blocks=32, block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(lfm_path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        want_LV = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    for p in range(1, len(prompt)):
        # the router's scores in float32 and its 1e-20 renormalisation (transformers: float64, 1e-6): ~1e-6
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(want_LV[p - 1, prompt[p]].item(), abs=1e-5)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


def test_greedy_parity_short(lfm_path):
    """Three prompts (5-40 tokens) under a 16-token budget: chunked prefills and decode steps of a batch."""
    ps = prompts(VOCAB, seed=3, n=3, lo=5, hi=40)
    llm = LLM(lfm_path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=8), hf_greedy(lfm_path, ps, max_new=8), ps)
    assert_pool_free(llm)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(lfm_path):
    check_chunked_batched(lfm_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(lfm_path):
    check_under_preemption(lfm_path, _prompts())


@pytest.mark.slow
def test_preemption_then_prefix_hits(lfm_path):
    """Preempted sequences recompute their conv states; the same prompts again resume from state checkpoints."""
    check_preemption_then_prefix_hits(lfm_path, _prompts())


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.7, 0.0])
def test_speculative_decoding_replays_conv_states(lfm_path, p_right):
    """Drafts right with probability 0.7, and always wrong: the verifying sequences' conv states take only their
    accepted tokens (ShortConvMixer.replay_states), so greedy outputs equal transformers'."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    ps = _prompts()[:6]
    want = hf_greedy(lfm_path, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, p_right,
                                                 vocab=VOCAB, seed=4)}
    llm = LLM(lfm_path, speculative_config=spec, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=48, block_size=8, num_state_checkpoints=8)
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0
    assert (sd.num_accepted_tokens > 0) == (p_right > 0)
    assert_pool_free(llm)


@pytest.mark.slow
def test_fused_names_untied_no_expert_bias_parity(tmp_path):
    """transformers 5's own names (fused experts under feed_forward.experts), an LM head of its own, no conv biases
    and no expert bias (plain top-k of the sigmoid scores)."""
    path = save_preset(tmp_path, LFM2_MOE, fused=True, tie_word_embeddings=False, conv_bias=False,
                       use_expert_bias=False)
    ps = prompts(VOCAB, seed=29, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


_TRITON_RUN = """
import collections, json, sys
import moelink.kernels.triton_causal_conv1d as cc
from moelink.engine import LLM, SamplingParams
calls = collections.Counter()
for name in ("triton_causal_conv1d", "triton_causal_conv1d_update"):
    fn = getattr(cc, name)
    setattr(cc, name, lambda *a, _fn=fn, _n=name, **k: calls.update([_n]) or _fn(*a, **k))  # read when built
llm = LLM(sys.argv[1], kernels="triton", skip_warmup=True, **json.loads(sys.argv[3]))
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print("CALLS", json.dumps(calls))
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_kernels_equal_reference_kernels_greedy(tmp_path):
    """Float32 on the Triton kernels (the short conv's causal conv without an activation, prefill and decode; the
    rest of TritonKernels; the interpreter on a CPU) gives the reference kernels' greedy tokens: chunked prompts,
    two sequences per step, decodes."""
    import json
    import os
    import sys

    from tests.helpers import zygote
    from tests.helpers.fast_interpreter import interpreter_env

    path = save_preset(tmp_path, LFM2_MOE)
    ps = prompts(VOCAB, seed=7, n=2, lo=11, hi=21)
    engine = dict(dtype="float32", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=24, block_size=8)
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, path, json.dumps(ps), json.dumps(engine)], env=env,
                      capture_output=True, text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = json.loads(proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0])
    assert calls.get("triton_causal_conv1d", 0) > 0 and calls.get("triton_causal_conv1d_update", 0) > 0, calls
    llm = LLM(path, kernels="reference", **engine)
    assert_same(got, engine_greedy(llm, ps, max_new=4), ps)


def test_published_shape_reads(tmp_path):
    """transformers' default Lfm2MoeConfig (LFM2-8B-A1B's sizes: 32 experts of 1792, top-4, 2 dense layers, tied)
    with a layer_types of LFM2-8B-A1B's shape (transformers' default names none and its model cannot be built
    without one) reads: 6 attention layers among 24, every conv state [2, 2048]."""
    import transformers

    types = ["full_attention" if i in (2, 6, 10, 14, 18, 21) else "conv" for i in range(24)]
    cfg = transformers.Lfm2MoeConfig(num_hidden_layers=24, layer_types=types)
    cfg.architectures = ["Lfm2MoeForCausalLM"]
    m = ModelConfig.from_pretrained(config_dir(tmp_path, cfg))
    assert len(m.state_layers) == 18 and m.sparse_layers == tuple(range(2, 24)) and m.tie_word_embeddings
    assert (m.num_experts, m.moe_intermediate_size, m.moe.router.top_k, m.attention.rope.theta) == (32, 1792, 4,
                                                                                                   1e6)
    assert m.attention_for(0).state_shapes(4) == ((5, 2, 2048),)
    with pytest.raises(ValueError, match=r"config.json layer_types=\[\] is not supported"):
        cfg = transformers.Lfm2MoeConfig(num_hidden_layers=24)
        cfg.architectures = ["Lfm2MoeForCausalLM"]
        ModelConfig.from_pretrained(config_dir(tmp_path / "none", cfg))
