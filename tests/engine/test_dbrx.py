"""DBRX (DbrxForCausalLM: dbrx-base, dbrx-instruct) against transformers 5.24's own model: config reading and its
refusals, greedy parity with transformers' `generate` in float64, token for token (1-150-token prompts together
under a small token budget, again under a KV pool small enough to preempt, prefix-cache hits, a rotary base of
500,000 as published), and an expert-parallel rank reading only its experts' rows of the fused w1 / v1 / w2. What the
family adds: LayerNorms without bias (its residual and head kinds), the fused Wqkv clamped at clip_qkv
(GQAConfig.clip_qkv), the experts stored fused as [E * I, D] (w2 transposed), its sub-configs (attn_config,
ffn_config). Checkpoints: the family's tiny model (engine/models/dbrx/tiny.py), saved by transformers."""
from __future__ import annotations

import pytest
import torch

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.dbrx.tiny import DBRX, save_dbrx
from moelink.engine.tools.tiny_families import preset_config

from tests.helpers.config_dirs import config_dir
from tests.helpers.drawn_presets import VOCAB
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def dbrx_path(tmp_path_factory) -> str:
    return save_dbrx(tmp_path_factory.mktemp("dbrx"))


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, preset_config(DBRX, **overrides), edit)


def _sub(name: str, **fields):
    """An edit of config.json's sub-config `name` (attn_config, ffn_config)."""
    return lambda raw: raw[name].update(fields)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """GQA 4 / 2 (head_dim d_model / n_heads) clamped at 1.0, rotary by attn_config.rope_theta; every layer routed,
    softmax top-2 renormalised; LayerNorm eps 1e-5."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, r = cfg.attention, cfg.moe.router
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.clip_qkv, a.rope.theta) == (4, 2, 16, None, 1.0,
                                                                                             10000.0)
    assert not a.qkv_bias and not a.o_bias and cfg.sparse_layers == (0, 1, 2) and cfg.rms_norm_eps == 1e-5
    assert (r.scoring_func, r.topk_method, r.norm_topk_prob, cfg.num_experts, cfg.top_k) == (
        "softmax", "greedy", True, 6, 2)
    assert cfg.moe_intermediate_size == 16 and cfg.moe.n_shared_experts == 0


def test_config_published_rope_theta_and_no_normalisation(tmp_path):
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, edit=lambda raw: (
        raw["attn_config"].update(rope_theta=500000), raw["ffn_config"].update(moe_normalize_expert_weights=None))))
    assert cfg.attention.rope.theta == 500000.0 and not cfg.moe.router.norm_topk_prob


@pytest.mark.parametrize("edit,match", [
    (_sub("ffn_config", moe_normalize_expert_weights=2.0),
     r"config.json ffn_config.moe_normalize_expert_weights=2.0 is not supported"),
    (_sub("ffn_config", ffn_act_fn={"name": "gelu"}), r"config.json ffn_config.ffn_act_fn.name='gelu' is not supported"),
    (_sub("attn_config", clip_qkv=-1.0), r"config.json clip_qkv=-1.0 is not supported"),
    (_sub("attn_config", rope_theta=0), r"config.json attn_config.rope_theta=0 is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_expert_parallel_rank_reads_its_rows(dbrx_path):
    """An EP rank holding experts 3-5 reads those rows of w1 / v1 / w2 (and no others): its stacks equal the whole
    model's for those experts."""
    from moelink.engine.rank.loader import load_model
    from moelink.kernels.ops import ReferenceKernels
    from moelink.moe.layer import ExpertParallel
    from moelink.moe.placement import ExpertPlacement

    cfg = ModelConfig.from_pretrained(dbrx_path, "float64")
    cpu = torch.device("cpu")
    whole = load_model(cfg, ReferenceKernels(), cpu)
    placement = ExpertPlacement(6, 2)
    rank = load_model(cfg, ReferenceKernels(), cpu, ExpertParallel(1, 2, placement, None, placement.to_tensors("cpu")))
    for a, b in zip(whole.layers, rank.layers):
        assert torch.equal(a.moe.w13_EFD[3:], b.moe.w13_EFD) and torch.equal(a.moe.w2_EDI[3:], b.moe.w2_EDI)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(dbrx_path):
    check_chunked_batched(dbrx_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(dbrx_path):
    check_under_preemption(dbrx_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(dbrx_path):
    check_prefix_cache_parity(LLM, dbrx_path, VOCAB, n=3, max_suffix=5)


@pytest.mark.slow
def test_published_rope_theta_parity(tmp_path):
    """attn_config.rope_theta 500,000 as published: transformers 5.24 rotates by rope_parameters (it reads no
    attn_config.rope_theta), so the checkpoint states both; the tokens equal transformers'."""
    path = save_dbrx(tmp_path, attn_config=dict(kv_n_heads=2, clip_qkv=1.0, rope_theta=500000.0),
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    ps = prompts(VOCAB, seed=37, n=4, lo=20, hi=80)
    llm = LLM(path, dtype="float64", max_num_seqs=4, max_num_batched_tokens=24, num_kv_blocks=64, block_size=8)
    assert_same(engine_greedy(llm, ps), hf_greedy(path, ps), ps)


def test_lora_is_refused(dbrx_path):
    with pytest.raises(ValueError, match=r"enable_lora is not supported for DbrxForCausalLM yet: its fused Wqkv"):
        LLM(dbrx_path, dtype="float64", enable_lora=True)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default DbrxConfig (DBRX's (4 experts, top-1)) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "DbrxConfig")()
    cfg.architectures = ["DbrxForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "DbrxForCausalLM"
