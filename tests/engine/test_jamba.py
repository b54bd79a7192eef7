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

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.jamba.tiny import JAMBA
from moelink.engine.models.mamba1_config import Mamba1Config

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import config_of, save_preset
from tests.helpers.hybrid_parity import (check_greedy_short, check_prompt_logprobs, check_spec_decode_replays_states,
                                         check_tied_embeddings, check_triton_equals_reference, parity_prompts)
from tests.helpers.parity import check_chunked_batched, check_preemption_then_prefix_hits, check_under_preemption

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
    check_prompt_logprobs(jamba_path)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def test_greedy_parity_short(jamba_path):
    check_greedy_short(jamba_path)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(jamba_path):
    check_chunked_batched(jamba_path, parity_prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(jamba_path):
    check_under_preemption(jamba_path, parity_prompts())


@pytest.mark.slow
def test_preemption_then_prefix_hits(jamba_path):
    """Preempted sequences recompute their states; the same prompts again resume from state checkpoints."""
    check_preemption_then_prefix_hits(jamba_path, parity_prompts())


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.7, 0.0])
def test_speculative_decoding_replays_mamba_states(jamba_path, p_right):
    """Drafts right with probability 0.7, and always wrong: the verifying sequences' Mamba1 states take only their
    accepted tokens (Mamba1Mixer.replay_states), so greedy outputs equal transformers'."""
    check_spec_decode_replays_states(jamba_path, p_right)


@pytest.mark.slow
def test_tied_embeddings_parity(tmp_path):
    """tie_word_embeddings: the LM head is the embedding table."""
    check_tied_embeddings(tmp_path, JAMBA)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default JambaConfig (attention every 8th layer from 4, experts every 2nd from 1) reads."""
    import transformers

    cfg = getattr(transformers, "JambaConfig")(num_hidden_layers=8)
    cfg.architectures = ["JambaForCausalLM"]
    got = ModelConfig.from_pretrained(config_dir(tmp_path, cfg))
    assert got.state_layers == (0, 1, 2, 3, 5, 6, 7) and got.sparse_layers == (1, 3, 5, 7)
    assert got.attention_for(0).dt_rank == 256  # "auto": ceil(4096 / 16)


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_kernels_equal_reference_kernels_greedy(tmp_path):
    """Float32 on the Triton kernels (the Mamba1 scan's, the conv's, the rest of TritonKernels; the interpreter on a
    CPU) gives the reference kernels' greedy tokens: chunked prompts, two sequences per step, decodes."""
    check_triton_equals_reference(tmp_path, JAMBA, "moelink.kernels.triton_mamba1",
                                  ("triton_mamba1_scan", "triton_mamba1_decode"))
