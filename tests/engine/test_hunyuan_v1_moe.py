"""HunYuan-MoE-V1 (HunYuanMoEV1ForCausalLM: tencent/Hunyuan-A13B-Instruct) against transformers 5.24's own model:
config reading and its refusals, and greedy parity with transformers' `generate` in float64, token for token: 1-150-
token prompts together under a small token budget (chunked prefill, batches), again under a KV pool small enough to
preempt, prefix-cache hits, transformers 5's own checkpoint names. What the family adds: the per-head q/k RMSNorm
after the rotary (GQAConfig.qk_norm_after_rope), the published rope ("dynamic" with a fixed alpha: a larger base),
moe_topk per layer, softmax top-k renormalised beside an ungated shared MLP, transformers' names (query_layernorm,
key_layernorm, mlp.gate.wg, mlp.shared_mlp). Checkpoints: the family's tiny model
(engine/models/hunyuan_v1_moe/tiny.py, drawn by save_drawn_preset), saved by transformers."""
from __future__ import annotations

import pytest

from moelink.engine import LLM
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.gqa_config import GQAConfig
from moelink.engine.models.hunyuan_v1_moe.tiny import HUNYUAN_V1_MOE
from moelink.engine.models.rope_config import RopeConfig

from tests.helpers.config_dirs import config_dir, set_fields
from tests.helpers.drawn_presets import VOCAB, config_of, save_preset
from tests.helpers.parity import (assert_same, check_chunked_batched, check_prefix_cache_parity,
                                  check_under_preemption, engine_greedy, hf_greedy, prompts)

pytestmark = pytest.mark.usefixtures("heap_held_frozen")  # engine starts collect only what is new (tests/conftest.py)


@pytest.fixture(scope="module")
def hunyuan_path(tmp_path_factory) -> str:
    return save_preset(tmp_path_factory.mktemp("hunyuan_v1_moe"), HUNYUAN_V1_MOE)


def _config_dir(tmp_path, edit=None, **overrides) -> str:
    return config_dir(tmp_path, config_of(HUNYUAN_V1_MOE, **overrides), edit)


# -- config ---------------------------------------------------------------------------------------------------

def test_config(tmp_path):
    """GQA 4 / 2, the per-head q/k norm after the rotary, whose base is rope_theta * alpha ** (16 / 14); every layer
    routed: softmax top-2 of 6 renormalised, the float32 router, one ungated shared MLP as wide as the experts."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path))
    a, m = cfg.attention, cfg.moe
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.qk_norm_after_rope) == (4, 2, 16, "per_head", True)
    assert (a.rope.rope_type, a.rope.rotary_dim) == ("default", 16)
    assert a.rope.theta == pytest.approx(10000.0 * 50.0 ** (16 / 14), rel=1e-15)
    assert not a.qkv_bias and not a.o_bias
    assert cfg.sparse_layers == (0, 1, 2) and (cfg.num_experts, cfg.top_k) == (6, 2)
    assert (m.router.scoring_func, m.router.norm_topk_prob, m.router.float32_logits) == ("softmax", True, True)
    assert (m.n_shared_experts, m.shared_expert_intermediate_size, m.shared_expert_gate) == (1, 16, False)
    assert (cfg.moe_intermediate_size, cfg.intermediate_size) == (16, 16)


def test_config_plain_rope_and_scalar_topk(tmp_path):
    """A plain rope keeps rope_theta; moe_topk as one integer; attention_bias on q/k/v and o_proj."""
    cfg = ModelConfig.from_pretrained(_config_dir(tmp_path, moe_topk=3, attention_bias=True, rope_parameters={
        "rope_type": "default", "rope_theta": 5000.0}))
    assert cfg.attention.rope.theta == 5000.0 and cfg.top_k == 3
    assert cfg.attention.qkv_bias and cfg.attention.o_bias


@pytest.mark.parametrize("edit,match", [
    (set_fields(moe_topk=[2, 1, 2]), r"config.json moe_topk=\[2, 1, 2\] is not supported: allowed: a positive "
                                     r"integer, or one equal integer for each"),
    (set_fields(moe_topk=[2, 2]), r"config.json moe_topk=\[2, 2\] is not supported"),
    (set_fields(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     r"config.json rope_parameters.alpha=None is not supported"),
    (set_fields(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0,
                                 "original_max_position_embeddings": 256}),
     None),  # yarn is a common type: read, not refused
    (set_fields(use_cla=True), r"config.json use_cla=True is not supported"),
    (set_fields(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (set_fields(num_experts=0), r"config.json num_experts=0 is not supported"),
])
def test_config_refusals(tmp_path, edit, match):
    if match is None:
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))
        return
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_pretrained(_config_dir(tmp_path, edit))


def test_norm_after_rope_needs_a_per_head_norm():
    with pytest.raises(ValueError, match="qk_norm_after_rope is invalid without qk_norm='per_head'"):
        GQAConfig(4, 2, 16, RopeConfig(16), qk_norm="all_heads", qk_norm_after_rope=True)


def test_transformers5_layout(tmp_path):
    """A checkpoint in transformers 5's own names (fused experts) runs as the published layout does: transformers'
    tokens for two prompts."""
    path = save_preset(tmp_path, HUNYUAN_V1_MOE, fused=True)
    ps = prompts(VOCAB, seed=9, n=2, lo=3, hi=20)
    llm = LLM(path, dtype="float64", max_num_seqs=2, max_num_batched_tokens=16, num_kv_blocks=32, block_size=4)
    assert_same(engine_greedy(llm, ps, max_new=4), hf_greedy(path, ps, max_new=4), ps)


# -- greedy parity with transformers ------------------------------------------------------------------------------

def _prompts() -> list[list[int]]:
    return prompts(VOCAB, seed=61, n=12, lo=1, hi=150)


@pytest.mark.slow  # transformers' generate beside the engine, in float64
def test_greedy_parity_chunked_batched(hunyuan_path):
    check_chunked_batched(hunyuan_path, _prompts())


@pytest.mark.slow
def test_greedy_parity_under_preemption(hunyuan_path):
    check_under_preemption(hunyuan_path, _prompts())  # the chunked test's prompts: transformers' outputs are cached


@pytest.mark.slow
def test_prefix_cache_hit_parity(hunyuan_path):
    check_prefix_cache_parity(LLM, hunyuan_path, VOCAB, n=3, max_suffix=5)


def test_transformers_default_config_reads(tmp_path):
    """transformers' default HunYuanMoEV1Config (one expert, top-1, plain rope) reads without a refusal."""
    import transformers

    cfg = getattr(transformers, "HunYuanMoEV1Config")()
    cfg.architectures = ["HunYuanMoEV1ForCausalLM"]
    assert ModelConfig.from_pretrained(config_dir(tmp_path, cfg)).architecture == "HunYuanMoEV1ForCausalLM"


@pytest.mark.slow
def test_fp8_block_checkpoint(tmp_path):
    """The FP8 block layout (`moelink quantize-fp8`, 16 x 16 blocks: q/k/v/o, the experts and the shared MLP) loads
    through the FP8 block path and gives the greedy tokens of transformers' float64 model on the dequantized weights
    with the W8A8 activation rounding where the engine applies it. The router and the norms stay float."""
    from tests.helpers.fp8_checkpoints import check_fp8_gqa_block_parity

    check_fp8_gqa_block_parity(save_preset(tmp_path / "float", HUNYUAN_V1_MOE), tmp_path, VOCAB)
