"""Ling's hybrid (BailingHybridForCausalLM) against transformers 5.24's own model: config reading, the published
names (model.word_embeddings, `attention`, `attention.dense`, `mlp.gate.expert_bias`: the "ling" checkpoint kind),
and greedy parity with transformers' `generate` in float64, token for token: 1-150-token prompts together under a
small token budget, under preemption with the same prompts again resuming from state checkpoints, and prefill/decode
over TCP with the KDA states beside the MLA latents. What the family adds beside Kimi Linear's kinds: KDA's
full-rank gates and bounded forget gate (KimiDeltaConfig's variants) and MLA's per-head output gate
(MLAConfig.output_gate); the parity tests fail with either undone (measured: the gate dropped, or the forget gate
unbounded, prompt 0 differs from its first or second token). Checkpoints: the family's preset (tests/helpers/drawn_presets.py); TP 2
and EP 2 in tests/ep/test_tp_families.py."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.bailing_hybrid.tiny import BAILING

from tests.helpers.config_dirs import config_dir
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import check_chunked_batched, check_preemption_then_prefix_hits, prompts

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def ling_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("ling"), BAILING)


def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=89, n=12, lo=1, hi=150)


def test_config(tmp_path):
    cfg = ModelConfig.from_pretrained(config_dir(tmp_path, config_of(BAILING)))
    kinds = [cfg.attention_for(i) for i in range(cfg.num_layers)]
    assert [a.kind for a in kinds] == ["kda", "mla", "kda", "kda", "mla"] and cfg.linear_layers == (0, 2, 3)
    kda, mla = kinds[0], kinds[1]
    assert (kda.forget_gate, kda.output_gate, kda.gate_lower_bound, kda.decay_in_model_dtype) == (
        "full", "full", -5.0, True)
    assert mla.output_gate and mla.rotary and mla.rope.style == "interleaved"
    assert cfg.sparse_layers == (2, 3, 4) and cfg.moe.n_shared_experts == 1


def test_published_names_are_read(ling_path):
    """The engine's plan names under the published ones, and every tensor of the decoder is read."""
    from moelink.engine.models.bailing_hybrid.kinds import published_name

    assert published_name("model.embed_tokens.weight") == "model.word_embeddings.weight"
    assert published_name("model.layers.3.self_attn.o_proj.weight") == "model.layers.3.attention.dense.weight"
    assert published_name("model.layers.3.self_attn.q_conv1d.weight") == "model.layers.3.attention.q_conv1d.weight"
    with LLM(ling_path, dtype="float64", max_num_seqs=1, num_kv_blocks=16, block_size=8) as llm:
        model = llm.engine.executor.worker.runner.model
        assert model.layers[1].mixer.g_proj is not None and float(model.embed_tokens.abs().sum()) > 0


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(ling_path):
    check_chunked_batched(ling_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption_and_prefix_hits(ling_path):
    check_preemption_then_prefix_hits(ling_path, _prompts())


@pytest.mark.slow
def test_pd_transfer_equals_one_engine(ling_path):
    from tests.helpers.kv_disagg import check_pd_transfer

    check_pd_transfer(ling_path, prompts(VOCAB, seed=61, n=4, lo=2, hi=40))
