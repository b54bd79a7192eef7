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

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.granitemoe.tiny import GRANITE_HYBRID
from moelink.engine.models.mamba2_config import Mamba2Config

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import config_of, save_preset
from tests.helpers.hybrid_parity import (check_greedy_short, check_prompt_logprobs, check_spec_decode_replays_states,
                                         check_tied_embeddings, check_triton_equals_reference, parity_prompts)
from tests.helpers.parity import check_chunked_batched, check_preemption_then_prefix_hits, check_under_preemption

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
    check_prompt_logprobs(hybrid_path)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def test_greedy_parity_short(hybrid_path):
    check_greedy_short(hybrid_path)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(hybrid_path):
    check_chunked_batched(hybrid_path, parity_prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(hybrid_path):
    check_under_preemption(hybrid_path, parity_prompts())


@pytest.mark.slow
def test_preemption_then_prefix_hits(hybrid_path):
    """Preempted sequences recompute their states; the same prompts again resume from state checkpoints."""
    check_preemption_then_prefix_hits(hybrid_path, parity_prompts())


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.7, 0.0])
def test_speculative_decoding_replays_mamba_states(hybrid_path, p_right):
    """Drafts right with probability 0.7, and always wrong: the verifying sequences' Mamba2 states take only their
    accepted tokens (Mamba2Mixer.replay_states), so greedy outputs equal transformers'."""
    check_spec_decode_replays_states(hybrid_path, p_right)


@pytest.mark.slow
def test_tied_embeddings_parity(tmp_path):
    """As published: the LM head is the embedding table (the embedding multiplier divided out of the final norm)."""
    check_tied_embeddings(tmp_path, GRANITE_HYBRID)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default GraniteMoeHybridConfig (every layer Mamba2 but for the layer_types given here) reads."""
    import transformers

    cfg = getattr(transformers, "GraniteMoeHybridConfig")(num_hidden_layers=2,
                                                          layer_types=["mamba", "attention"])
    cfg.architectures = ["GraniteMoeHybridForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).state_layers == (0,)


@pytest.mark.slow  # a fresh process, and the interpreter runs every kernel of each step
def test_triton_kernels_equal_reference_kernels_greedy(tmp_path):
    """Float32 on the Triton kernels (the Mamba2 scan's, the conv's, the rest of TritonKernels; the interpreter on a
    CPU) gives the reference kernels' greedy tokens: chunked prompts, two sequences per step, decodes."""
    check_triton_equals_reference(tmp_path, GRANITE_HYBRID, "moelink.kernels.triton_mamba2",
                                  ("triton_mamba2_scan", "triton_mamba2_decode"))
