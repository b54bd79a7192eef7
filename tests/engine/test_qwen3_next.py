"""Qwen3-Next (gated DeltaNet beside gated full attention, issue 42) from a checkpoint transformers saved: greedy
outputs equal transformers' token for token in float64, with chunked prefill and several sequences per step, under
preemption, and resuming from prefix-cache state checkpoints (scheduler/hybrid_cache.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig

from tests.helpers.hf_checkpoints import VOCAB
from tests.helpers.parity import (assert_pool_free, assert_same, check_preemption_then_prefix_hits, engine_greedy,
                                  hf_greedy, prompts)

NAME = "qwen3_next"


def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=42, n=10, lo=1, hi=150)


def test_config_reads_layer_kinds_and_state_sizes(hf_tiny_model):
    cfg = ModelConfig.from_pretrained(hf_tiny_model(NAME), dtype="float64")
    assert cfg.linear_layers == (0, 1, 3)
    assert cfg.attention.output_gate and cfg.attention.rope.rotary_dim == 4 and cfg.norm_weight_offset == 1.0
    assert cfg.sparse_layers == (0, 1, 2, 3) and cfg.moe.shared_expert_gate
    la = cfg.attention_for(0)
    # conv state: 3 rows of (2 * 2 * 8 + 4 * 12) channels in float64; recurrent: 4 heads x 8 x 12 in float32
    assert la.state_bytes_per_sequence(cfg.dtype) == 3 * 80 * 8 + 4 * 8 * 12 * 4
    from moelink.engine.config import kv_sizing
    assert kv_sizing.kv_cache_bytes_per_block(cfg, 16) == 2 * (2 * 2 * 16 * 8) * 16  # the 2 full layers only


@pytest.mark.slow
def test_greedy_parity_chunked_batched(hf_tiny_model):
    path = hf_tiny_model(NAME)
    ps = _prompts()
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=256, block_size=16)
    got = engine_greedy(llm, ps)
    assert len({t for out in got for t in out}) > 10, "degenerate model: greedy outputs barely vary"
    assert_same(got, hf_greedy(path, ps), ps)
    assert_pool_free(llm)


@pytest.mark.slow
def test_greedy_parity_under_preemption_and_prefix_hits(hf_tiny_model):
    """A pool small enough to preempt, then the same prompts again: they resume from state checkpoints (hits
    asserted) and still equal transformers."""
    check_preemption_then_prefix_hits(hf_tiny_model(NAME), _prompts())


@pytest.mark.slow
def test_a_chats_next_turn_resumes_from_the_answers_last_block(hf_tiny_model):
    """Turn 2 = turn 1's prompt + its answer + a new message: it resumes from the state the answer's decode saved at
    its last block boundary (scheduler/hybrid_cache.py: the rolling tail outlives the request), not only from the
    prompt's checkpoint, and equals transformers."""
    path = hf_tiny_model(NAME)
    turn1 = prompts(VOCAB, seed=7, n=3, lo=13, hi=30)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=64, num_kv_blocks=64, block_size=8,
              num_state_checkpoints=6)  # the 3 prompts' checkpoints and the 3 answers' tails
    answers = engine_greedy(llm, turn1)
    turn2 = [p + a + [5, 6, 7] for p, a in zip(turn1, answers)]
    hits_before = llm.engine.stats().prefix_cache_hits
    got = engine_greedy(llm, turn2)
    # Each answer's decode wrote up to len(p) + 9 tokens: its last boundary is past the prompt's.
    want_hits = sum((len(p) + len(a) - 1) // 8 * 8 for p, a in zip(turn1, answers))
    assert llm.engine.stats().prefix_cache_hits - hits_before == want_hits
    assert_same(got, hf_greedy(path, turn2), turn2)
    assert_pool_free(llm)


@pytest.mark.slow
def test_qwen3_5_moe_multimodal_checkpoint_serves_its_text_model(hf_tiny_model):
    """Qwen3.5-MoE as published (Qwen3_5MoeForConditionalGeneration: text under model.language_model., a vision
    tower beside it, split linear-attention projections): the text model's greedy outputs equal transformers'."""
    path = hf_tiny_model("qwen3_5_moe")
    cfg = ModelConfig.from_pretrained(path, dtype="float64")
    assert cfg.architecture == "Qwen3_5MoeForCausalLM" and cfg.text_weights_prefix == "model.language_model."
    assert cfg.attention_for(0).projection == "split"
    ps = prompts(VOCAB, seed=7, n=6, lo=1, hi=120)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=40, num_kv_blocks=128, block_size=16)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)
    assert_pool_free(llm)


def test_an_image_request_to_a_multimodal_checkpoint_is_refused_naming_the_missing_tower(hf_tiny_model):
    from types import SimpleNamespace

    from moelink.engine.server.serving import Serving

    cfg = ModelConfig.from_pretrained(hf_tiny_model("qwen3_5_moe"))
    reason = Serving.text_only_reason(SimpleNamespace(model=cfg))
    assert "vision tower is not loaded" in reason and "Qwen3_5MoeForCausalLM" in reason
    text_cfg = ModelConfig.from_pretrained(hf_tiny_model(NAME))
    assert Serving.text_only_reason(SimpleNamespace(model=text_cfg)) == "this model takes text only."


def test_a_layer_kind_moelink_does_not_know_is_refused_naming_it(hf_tiny_model, tmp_path):
    import json
    import shutil

    src = hf_tiny_model(NAME)
    shutil.copytree(src, tmp_path / "m")
    cfg_file = tmp_path / "m" / "config.json"
    raw = json.loads(cfg_file.read_text())
    raw["layer_types"][1] = "mamba2"
    cfg_file.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="layer_types.*mamba2.*linear_attention"):
        ModelConfig.from_pretrained(str(tmp_path / "m"))


def _edited(src: str, tmp_path, **changes) -> str:
    """A copy of checkpoint `src` (its files linked) whose config.json has `changes`."""
    import json

    d = tmp_path / "m"
    d.mkdir()
    for f in Path(src).iterdir():
        if f.name != "config.json":
            (d / f.name).symlink_to(f)
    raw = json.loads((Path(src) / "config.json").read_text())
    raw.update(changes)
    (d / "config.json").write_text(json.dumps(raw))
    return str(d)


@pytest.mark.parametrize("changes, message", [
    # Issue 53: before, 1e6 sized the model and then read past the weights at load (an IndexError).
    (dict(linear_value_head_dim=10**6), r"config\.json linear_value_head_dim=1000000 is invalid: must be an integer "
                                        r"in \[1, 4096\]"),
    # In range, but not what the weights hold: refused from the headers, before the model is sized (the same
    # IndexError at load before).
    (dict(linear_value_head_dim=16), r"tensor 'model\.layers\.0\.linear_attn\.norm\.weight' has shape \[12\], where "
                                     r"config\.json \(linear_value_head_dim=16\) makes it \[16\]"),
    (dict(shared_expert_intermediate_size=10**9), r"shared_expert_intermediate_size=1000000000 is not supported: "
                                                  r"allowed: an integer in \[0, 262144\] \(0: no shared expert\)"),
])
def test_a_size_config_json_cannot_have_is_one_error_before_anything_is_sized(hf_tiny_model, tmp_path, changes,
                                                                               message):
    from moelink.engine.config.engine_args import EngineArgs

    d = _edited(hf_tiny_model(NAME), tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        EngineArgs(model=d, dtype="float64", num_kv_blocks=16, device="cpu").create_engine_config()


def test_a_legacy_mamba_layer_type_reads_as_transformers_reads_it(hf_tiny_model, tmp_path):
    """Issue 53 asked whether "mamba" in layer_types is accepted silently: transformers (>= 5.24, the pinned floor)
    reads it as "linear_attention" for every model (configuration_utils._LEGACY_LAYER_TYPE_REMAP), so its own
    Qwen3NextForCausalLM runs gated DeltaNet there, and moelink runs the same layer. A name transformers does not remap
    is refused listing the kinds (test_a_layer_kind_moelink_does_not_know_is_refused_naming_it)."""
    import json

    src = hf_tiny_model(NAME)
    types = json.loads((Path(src) / "config.json").read_text())["layer_types"]
    cfg = ModelConfig.from_pretrained(_edited(src, tmp_path, layer_types=["mamba", *types[1:]]))
    assert cfg.linear_layers == ModelConfig.from_pretrained(src).linear_layers == (0, 1, 3)


@pytest.mark.slow
def test_no_shared_expert_at_width_0_gives_transformers_tokens(tmp_path):
    """Issue 53: shared_expert_intermediate_size 0. transformers' Qwen3NextSparseMoeBlock always builds the shared MLP
    and its gate; at width 0 the MLP is empty and adds exactly 0. moelink reads 0 as no shared expert (its empty
    tensors and its gate left unread): greedy tokens equal transformers'."""
    import tests.helpers.hf_checkpoints as H

    config_cls, model_cls, fields = H.HF_HYBRID[NAME]
    H.HF_HYBRID["qwen3_next_no_shared"] = (config_cls, model_cls, dict(fields, shared_expert_intermediate_size=0))
    try:
        path = H.save_hf_checkpoint(tmp_path / "m", "qwen3_next_no_shared")
    finally:
        del H.HF_HYBRID["qwen3_next_no_shared"]
    cfg = ModelConfig.from_pretrained(path)
    assert (cfg.moe.n_shared_experts, cfg.moe.shared_expert_gate) == (0, False)
    ps = _prompts()[:3]
    assert_same(engine_greedy(LLM(path, dtype="float64", num_kv_blocks=64), ps), hf_greedy(path, ps), ps)


@pytest.mark.slow
@pytest.mark.parametrize("p_right", [0.7, 0.0])
def test_speculative_decoding_rolls_linear_states_back_past_rejected_drafts(hf_tiny_model, p_right):
    """Drafts right with probability 0.7 (some accepted, some rejected; a small pool so preemption and prefix
    hits happen too), and drafts always wrong: the verifying sequences' states take only their accepted tokens
    (GatedDeltaNet.replay_states), so greedy outputs equal plain decoding's."""
    import functools

    from moelink.benchmarks.spec_decode import OracleDrafter

    path = hf_tiny_model(NAME)
    ps = _prompts()[:6]
    kw = dict(dtype="float64", max_num_seqs=4, max_num_batched_tokens=48, num_kv_blocks=48, block_size=8,
              num_state_checkpoints=8)
    want = hf_greedy(path, ps)
    spec = {"method": "ngram", "num_speculative_tokens": 3,
            "drafter_factory": functools.partial(OracleDrafter, {tuple(p): w for p, w in zip(ps, want)}, p_right,
                                                 vocab=VOCAB, seed=4)}
    llm = LLM(path, speculative_config=spec, **kw)
    assert_same(engine_greedy(llm, ps), want, ps)
    sd = llm.engine.stats().spec_decode
    assert sd is not None and sd.num_draft_tokens > 0
    assert (sd.num_accepted_tokens > 0) == (p_right > 0)
    assert_pool_free(llm)


def test_dummy_weights_read_integer_plan_indices_back():
    """load_format='dummy' makes each tensor in its checkpoint shape, integer plan indices included (Qwen3-Next's
    conv1d.weight [C, 1, W] read as [C, W]; its shared_expert_gate [1, D] read as [D])."""
    from moelink.engine.rank.dummy_weights import checkpoint_shape

    assert checkpoint_shape((6, 4), (slice(None), 0)) == (6, 1, 4)
    assert checkpoint_shape((32,), (0,)) == (1, 32)


@pytest.mark.slow
def test_random_weights_load_for_a_hybrid_model(hf_tiny_model):
    llm = LLM(hf_tiny_model(NAME), dtype="float32", load_format="dummy", max_num_seqs=2, num_kv_blocks=32,
              block_size=16)
    assert len(engine_greedy(llm, [[1, 2, 3, 4, 5]])[0]) == 10
    assert_pool_free(llm)
