"""Granite 4.0-H (GraniteMoeHybridForCausalLM) against transformers 5.24's own model: config reading and its
refusals, greedy parity with transformers' `generate` in float64, token for token (1-150-token prompts together
under a small token budget, so prompts run as several prefill chunks whose Mamba2 states carry chunk to chunk; again
under a KV pool small enough to preempt, the states recomputed; prefix-cache hits resuming from state checkpoints;
speculative verify steps whose rejected drafts are replayed out of the states; tied embeddings), and prompt logprobs
equal to transformers'. What the family adds over Granite-MoE: Mamba2 layers (the shared "mamba2" kind,
engine/models/mamba2.py, kernels/mamba2.py) beside GQA layers without rotary (position_embedding_type "nope"), the
shared MLP beside the experts in every layer. Checkpoint: the family's tiny model (engine/models/granitemoe/tiny.py,
drawn by save_drawn_preset: norms and the conv bias random), saved by transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.granitemoe.tiny import GRANITE_HYBRID
from moelink.engine.models.mamba2_config import Mamba2Config

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_pool_free, assert_same, check_chunked_batched,
                                  check_preemption_then_prefix_hits, check_under_preemption, engine_greedy, hf_greedy,
                                  prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def hybrid_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("granitemoehybrid"), GRANITE_HYBRID)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(GRANITE_HYBRID, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """Layers 0, 2, 3 Mamba2 (their per-sequence states in the state pools), layer 1 GQA 4 / 2 without rotary with
    softmax scale attention_multiplier; every layer routed (top-2 of 6 by logits, softmax over the two) with the
    shared MLP 24 wide."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    m = cfg.attention_for(0)
    assert isinstance(m, Mamba2Config) and cfg.state_layers == (0, 2, 3)
    assert (m.num_heads, m.head_dim, m.n_groups, m.state_size, m.conv_kernel, m.conv_bias) == (4, 32, 2, 16, 4, True)
    assert (m.intermediate, m.conv_dim, m.in_proj_dim, m.dt_min, m.dt_max) == (128, 192, 324, 0.0, float("inf"))
    a = cfg.attention_for(1)
    assert (a.kind, a.num_heads, a.num_kv_heads, a.softmax_scale, a.rotates(1)) == ("gqa", 4, 2, 0.1, False)
    assert cfg.sparse_layers == (0, 1, 2, 3) and cfg.moe.n_shared_experts == 1
    assert cfg.moe.shared_expert_intermediate_size == 24
    rope = ModelConfig.from_pretrained(_config_dir(tmp_path / "rope", position_embedding_type="rope"))
    assert rope.attention_for(1).rotates(1)
    clamp = ModelConfig.from_pretrained(_config_dir(tmp_path / "clamp", time_step_limit=(0.01, 0.5)))
    assert (clamp.attention_for(0).dt_min, clamp.attention_for(0).dt_max) == (0.01, 0.5)
    # Its states count in the KV sizer: conv [3, 192] in the model dtype, SSM [4, 32, 16] in float32.
    assert m.state_bytes_per_sequence(torch.bfloat16) == 3 * 192 * 2 + 4 * 32 * 16 * 4
    assert m.state_bytes_per_sequence(torch.float64) == 3 * 192 * 8 + 4 * 32 * 16 * 8


@pytest.mark.parametrize("edit,match", [
    (set_fields(position_embedding_type="alibi"), r"config.json position_embedding_type='alibi' is not supported"),
    (set_fields(num_local_experts=0), r"config.json num_local_experts=0 is not supported for "
                                      r"GraniteMoeHybridForCausalLM \(its dense form"),
    (set_fields(mamba_proj_bias=True), r"config.json mamba_proj_bias=True is not supported for "
                                       r"GraniteMoeHybridForCausalLM"),
    (set_fields(layer_types=["linear_attention"] * 4), r"config.json layer_types=.* is not supported: allowed: at "
                                                       r"least one 'full_attention'"),
    (set_fields(mamba_n_groups=3), r"config.json mamba_n_heads=4 is invalid: must be a multiple of mamba_n_groups=3"),
    (set_fields(mamba_d_state=0), r"config.json mamba_d_state=0 is invalid"),
    (set_fields(time_step_limit=[0.5, 0.1]), r"config.json time_step_limit=\[0.5, 0.1\] is invalid"),
    (set_fields(residual_multiplier=-0.5), r"config.json residual_multiplier=-0.5 is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit=edit))


def test_tensor_parallel_is_refused(hybrid_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .* is not supported for GraniteMoeHybridForCausalLM:"
                                         r" its Mamba2 layers are not sharded yet"):
        LLM(hybrid_path, dtype="float64", tensor_parallel_size=2)


def test_decode_graphs_are_off_until_a_gpu_session_runs_the_kernel(tmp_path, caplog):
    """Mamba2Config.graphable is False: a Triton backend captures no decode graph for the model, and says why."""
    import logging

    from moelink.engine.rank.graph_policy import graph_sizes_to_capture
    from moelink.kernels.ops import ReferenceKernels

    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))

    class Triton(ReferenceKernels):
        name = "triton"

    with caplog.at_level(logging.INFO):
        assert graph_sizes_to_capture((1, 2), Triton(), None, False, None, torch.device("cuda"), False, cfg=cfg) == ()
    assert "mamba2 attention runs each sequence" in caplog.text


def test_lora_is_refused(hybrid_path):
    with pytest.raises(ValueError, match=r"enable_lora is not supported for GraniteMoeHybridForCausalLM yet: its muP "
                                         r"multipliers are folded into the weights at load"):
        LLM(hybrid_path, dtype="float64", enable_lora=True)


def test_prompt_logprobs_equal_transformers(hybrid_path):
    """A 40-token prompt in two prefill chunks: its logprobs equal transformers' log-softmax of its logits (divided by
    logits_scaling) in float64 (transformers' chunked scan runs in float32: 1e-5)."""
    prompt = prompts(VOCAB, seed=5, n=2, lo=40, hi=40)[0]
    llm = LLM(hybrid_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=24, num_kv_blocks=32,
              block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hybrid_path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        want_LV = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    for p in range(1, len(prompt)):
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(want_LV[p - 1, prompt[p]].item(), abs=1e-5)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


def test_greedy_parity_short(hybrid_path):
    """Three prompts (5-40 tokens) under a 16-token budget: chunked prefills and decode steps of a batch."""
    ps = prompts(VOCAB, seed=3, n=3, lo=5, hi=40)
    llm = LLM(hybrid_path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=8), hf_greedy(hybrid_path, ps, max_new=8), ps)
    assert_pool_free(llm)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(hybrid_path):
    check_chunked_batched(hybrid_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(hybrid_path):
    check_under_preemption(hybrid_path, _prompts())


@pytest.mark.slow
def test_preemption_then_prefix_hits(hybrid_path):
    """Preempted sequences recompute their states; the same prompts again resume from state checkpoints."""
    check_preemption_then_prefix_hits(hybrid_path, _prompts())


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.7, 0.0])
def test_speculative_decoding_replays_mamba_states(hybrid_path, p_right):
    """Drafts right with probability 0.7, and always wrong: the verifying sequences' Mamba2 states take only their
    accepted tokens (Mamba2Mixer.replay_states), so greedy outputs equal transformers'."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    ps = _prompts()[:6]
    want = hf_greedy(hybrid_path, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, p_right,
                                                 vocab=VOCAB, seed=4)}
    llm = LLM(hybrid_path, speculative_config=spec, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=48, block_size=8, num_state_checkpoints=8)
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0
    assert (sd.num_accepted_tokens > 0) == (p_right > 0)
    assert_pool_free(llm)


@pytest.mark.slow
def test_tied_embeddings_parity(tmp_path):
    """As published: the LM head is the embedding table (the embedding multiplier divided out of the final norm)."""
    path = save_preset(tmp_path, GRANITE_HYBRID, tie_word_embeddings=True)
    ps = prompts(VOCAB, seed=29, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default GraniteMoeHybridConfig (every layer Mamba2 but for the layer_types given here) reads."""
    import transformers

    cfg = getattr(transformers, "GraniteMoeHybridConfig")(num_hidden_layers=2,
                                                          layer_types=["mamba", "attention"])
    cfg.architectures = ["GraniteMoeHybridForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).state_layers == (0,)


_TRITON_RUN = """
import collections, json, sys
import moelink.kernels.triton_mamba2 as m2
from moelink.engine import LLM, SamplingParams
calls = collections.Counter()
for name in ("triton_mamba2_scan", "triton_mamba2_decode"):
    fn = getattr(m2, name)
    setattr(m2, name, lambda *a, _fn=fn, _n=name, **k: calls.update([_n]) or _fn(*a, **k))  # read when built
llm = LLM(sys.argv[1], kernels="triton", skip_warmup=True, **json.loads(sys.argv[3]))
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print("CALLS", json.dumps(calls))
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_kernels_equal_reference_kernels_greedy(tmp_path):
    """Float32 on the Triton kernels (the Mamba2 scan's, the conv's, the rest of TritonKernels; the interpreter on a
    CPU) gives the reference kernels' greedy tokens: chunked prompts, two sequences per step, decodes."""
    import json
    import os
    import sys

    from tests.helpers import zygote
    from tests.helpers.fast_interpreter import interpreter_env

    path = save_preset(tmp_path, GRANITE_HYBRID)
    ps = prompts(VOCAB, seed=7, n=2, lo=11, hi=21)
    engine = dict(dtype="float32", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=24, block_size=8)
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, path, json.dumps(ps), json.dumps(engine)], env=env,
                      capture_output=True, text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = json.loads(proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0])
    assert calls.get("triton_mamba2_scan", 0) > 0 and calls.get("triton_mamba2_decode", 0) > 0, calls
    llm = LLM(path, kernels="reference", **engine)
    assert_same(got, engine_greedy(llm, ps, max_new=4), ps)
