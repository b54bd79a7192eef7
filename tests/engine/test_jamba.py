"""Jamba (JambaForCausalLM) against transformers 5.24's own model: config reading and its refusals, greedy parity
with transformers' `generate` in float64, token for token (1-150-token prompts together under a small token budget,
so prompts run as several prefill chunks whose Mamba1 states carry chunk to chunk; again under a KV pool small
enough to preempt, the states recomputed; prefix-cache hits resuming from state checkpoints; speculative verify
steps whose rejected drafts are replayed out of the states), and prompt logprobs equal to transformers'. What the
family adds: Mamba1 layers (the shared "mamba1" kind, engine/models/mamba1.py, kernels/mamba1.py: a decay per channel
and state entry, Jamba's RMSNorms on dt, B and C) interleaved with GQA layers without positional embedding
(attn_layer_period / offset), routed FFNs (softmax over every expert, top-k not renormalized) interleaved with dense
ones (expert_layer_period / offset), the published feed_forward / pre_ff_layernorm / final_layernorm names.
Checkpoint: the family's tiny model (engine/models/jamba/tiny.py, drawn by save_drawn_preset: norms, the conv and
dt_proj biases random), saved by transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.jamba.tiny import JAMBA
from moelink.engine.models.mamba1_config import Mamba1Config

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_pool_free, assert_same, check_chunked_batched,
                                  check_preemption_then_prefix_hits, check_under_preemption, engine_greedy, hf_greedy,
                                  prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def jamba_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("jamba"), JAMBA)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(JAMBA, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """Layers 0, 2, 3 Mamba1 (their per-sequence states in the state pools), 1 and 4 GQA 4 / 2 without rotary;
    layers 1 and 3 routed (top-2 of 6, softmax over all six, not renormalized), 0, 2, 4 dense."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    m = cfg.attention_for(0)
    assert isinstance(m, Mamba1Config) and cfg.state_layers == (0, 2, 3)
    assert (m.intermediate, m.state_size, m.conv_kernel, m.dt_rank, m.conv_bias, m.inner_norms) == (
        128, 16, 4, 8, True, True)
    assert (m.conv_dim, m.x_proj_dim, m.norm_eps) == (128, 40, 1e-6)
    for i in (1, 4):
        a = cfg.attention_for(i)
        assert (a.kind, a.num_heads, a.num_kv_heads, a.head_dim, a.rotates(i)) == ("gqa", 4, 2, 16, False)
    assert cfg.sparse_layers == (1, 3) and cfg.num_experts == 6 and cfg.top_k == 2 and not cfg.norm_topk_prob
    assert cfg.moe.n_shared_experts == 0 and cfg.intermediate_size == cfg.moe_intermediate_size == 32
    auto = ModelConfig.from_pretrained(_config_dir(tmp_path / "auto", mamba_dt_rank="auto"))
    assert auto.attention_for(0).dt_rank == 4  # ceil(64 / 16)
    # Its states count in the KV sizer: conv [3, 128] in the model dtype, SSM [128, 16] in float32.
    assert m.state_bytes_per_sequence(torch.bfloat16) == 3 * 128 * 2 + 128 * 16 * 4
    assert m.state_bytes_per_sequence(torch.float64) == 3 * 128 * 8 + 128 * 16 * 8
    assert m.state_shapes(5) == ((6, 3, 128), (6, 128, 16))


@pytest.mark.parametrize("edit,match", [
    (set_fields(attn_layer_offset=7, attn_layer_period=8), r"config.json attn_layer_offset=7 is not supported"),
    (set_fields(expert_layer_offset=5, expert_layer_period=6), r"config.json expert_layer_offset=5 is not "
                                                                r"supported: allowed: below num_hidden_layers=5"),
    (set_fields(num_experts=1), r"config.json num_experts=1 is not supported for JambaForCausalLM"),
    (set_fields(mamba_proj_bias=True), r"config.json mamba_proj_bias=True is not supported for JambaForCausalLM"),
    (set_fields(mamba_d_state=0), r"config.json mamba_d_state=0 is invalid"),
    (set_fields(mamba_d_conv=1), r"config.json mamba_d_conv=1 is invalid: must be >= 2"),
    (set_fields(mamba_dt_rank=1 << 20), r"config.json mamba_dt_rank=1048576 is invalid"),
    (set_fields(mamba_expand=0), r"config.json mamba_expand=0 is not supported"),
    (set_fields(hidden_act="gelu"), r"config.json hidden_act='gelu' is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit=edit))


def test_tensor_parallel_is_refused(jamba_path):
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2 .* is not supported for JambaForCausalLM:"
                                         r" its Mamba1 layers are not sharded yet"):
        LLM(jamba_path, dtype="float64", tensor_parallel_size=2)


def test_decode_graphs_are_off_until_a_gpu_session_runs_the_kernel(tmp_path, caplog):
    """Mamba1Config.graphable is False: a Triton backend captures no decode graph for the model, and says why."""
    import logging

    from moelink.engine.rank.graph_policy import graph_sizes_to_capture
    from moelink.kernels.ops import ReferenceKernels

    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))

    class Triton(ReferenceKernels):
        name = "triton"

    with caplog.at_level(logging.INFO):
        assert graph_sizes_to_capture((1, 2), Triton(), None, False, None, torch.device("cuda"), False, cfg=cfg) == ()
    assert "mamba1 attention runs each sequence" in caplog.text


def test_lora_is_refused(jamba_path):
    with pytest.raises(ValueError, match=r"enable_lora is not supported for JambaForCausalLM yet: its Mamba1 layers"):
        LLM(jamba_path, dtype="float64", enable_lora=True)


def test_prompt_logprobs_equal_transformers(jamba_path):
    """A 40-token prompt in two prefill chunks: its logprobs equal transformers' log-softmax of its logits in float64
    (transformers' router softmax and its RMSNorms run in float32: 1e-5)."""
    prompt = prompts(VOCAB, seed=5, n=2, lo=40, hi=40)[0]
    llm = LLM(jamba_path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=24, num_kv_blocks=32, block_size=8)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(jamba_path, dtype=torch.float64, experts_implementation="eager").eval()
    with torch.no_grad():
        want_LV = torch.log_softmax(hf(torch.tensor([prompt])).logits[0, :-1], dim=-1)
    for p in range(1, len(prompt)):
        assert out.prompt_logprobs[p][prompt[p]].logprob == pytest.approx(want_LV[p - 1, prompt[p]].item(), abs=1e-5)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


def test_greedy_parity_short(jamba_path):
    """Three prompts (5-40 tokens) under a 16-token budget: chunked prefills and decode steps of a batch."""
    ps = prompts(VOCAB, seed=3, n=3, lo=5, hi=40)
    llm = LLM(jamba_path, dtype="float64", max_num_seqs=3, max_num_batched_tokens=16, num_kv_blocks=64, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=8), hf_greedy(jamba_path, ps, max_new=8), ps)
    assert_pool_free(llm)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(jamba_path):
    check_chunked_batched(jamba_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(jamba_path):
    check_under_preemption(jamba_path, _prompts())


@pytest.mark.slow
def test_preemption_then_prefix_hits(jamba_path):
    """Preempted sequences recompute their states; the same prompts again resume from state checkpoints."""
    check_preemption_then_prefix_hits(jamba_path, _prompts())


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.7, 0.0])
def test_speculative_decoding_replays_mamba_states(jamba_path, p_right):
    """Drafts right with probability 0.7, and always wrong: the verifying sequences' Mamba1 states take only their
    accepted tokens (Mamba1Mixer.replay_states), so greedy outputs equal transformers'."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    ps = _prompts()[:6]
    want = hf_greedy(jamba_path, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, p_right,
                                                 vocab=VOCAB, seed=4)}
    llm = LLM(jamba_path, speculative_config=spec, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48,
              num_kv_blocks=48, block_size=8, num_state_checkpoints=8)
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0
    assert (sd.num_accepted_tokens > 0) == (p_right > 0)
    assert_pool_free(llm)


@pytest.mark.slow
def test_tied_embeddings_parity(tmp_path):
    """tie_word_embeddings: the LM head is the embedding table."""
    path = save_preset(tmp_path, JAMBA, tie_word_embeddings=True)
    ps = prompts(VOCAB, seed=29, n=4, lo=2, hi=60)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default JambaConfig (attention every 8th layer from 4, experts every 2nd from 1) reads."""
    import transformers

    cfg = getattr(transformers, "JambaConfig")(num_hidden_layers=8)
    cfg.architectures = ["JambaForCausalLM"]
    got = ModelConfig.from_pretrained(config_dir(tmp_path, cfg))
    assert got.state_layers == (0, 1, 2, 3, 5, 6, 7) and got.sparse_layers == (1, 3, 5, 7)
    assert got.attention_for(0).dt_rank == 256  # "auto": ceil(4096 / 16)


_TRITON_RUN = """
import collections, json, sys
import moelink.kernels.triton_mamba1 as m1
from moelink.engine import LLM, SamplingParams
calls = collections.Counter()
for name in ("triton_mamba1_scan", "triton_mamba1_decode"):
    fn = getattr(m1, name)
    setattr(m1, name, lambda *a, _fn=fn, _n=name, **k: calls.update([_n]) or _fn(*a, **k))  # read when built
llm = LLM(sys.argv[1], kernels="triton", skip_warmup=True, **json.loads(sys.argv[3]))
ps = json.loads(sys.argv[2])
outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
print("CALLS", json.dumps(calls))
print("TOKENS", json.dumps([o.outputs[0].token_ids for o in outs]))
"""


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_kernels_equal_reference_kernels_greedy(tmp_path):
    """Float32 on the Triton kernels (the Mamba1 scan's, the conv's, the rest of TritonKernels; the interpreter on a
    CPU) gives the reference kernels' greedy tokens: chunked prompts, two sequences per step, decodes."""
    import json
    import os
    import sys

    from tests.helpers import zygote
    from tests.helpers.fast_interpreter import interpreter_env

    path = save_preset(tmp_path, JAMBA)
    ps = prompts(VOCAB, seed=7, n=2, lo=11, hi=21)
    engine = dict(dtype="float32", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=24, block_size=8)
    env = interpreter_env() if not torch.cuda.is_available() else dict(os.environ)
    proc = zygote.run([sys.executable, "-c", _TRITON_RUN, path, json.dumps(ps), json.dumps(engine)], env=env,
                      capture_output=True, text=True, timeout=600, cwd=os.getcwd(), fork_code=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.split("TOKENS", 1)[1])
    calls = json.loads(proc.stdout.split("CALLS", 1)[1].split("TOKENS")[0])
    assert calls.get("triton_mamba1_scan", 0) > 0 and calls.get("triton_mamba1_decode", 0) > 0, calls
    llm = LLM(path, kernels="reference", **engine)
    assert_same(got, engine_greedy(llm, ps, max_new=4), ps)
