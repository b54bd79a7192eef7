"""The cluster model's model shapes agree with the engine's own model for the same config.json.

For each planner model, the config transformers would write for it is read by the engine and its decoder
is built on the meta device (no memory, no weights): the weight matrices it holds (every parameter of two
or more dims: embedding, LM head, projections, router gates, stacked experts) must add up exactly to the
planner's `total_params()`, and its KV cache bytes per token per layer to the planner's `kv_elems_per_token`.
The planner leaves out only vectors (norm weights, DeepSeek's router bias), which decide no time.
"""
from __future__ import annotations

import pytest
import torch

from moelink.engine.config import kv_sizing
from moelink.engine.config.model import ModelConfig
from moelink.engine.models.registry import arch_spec
from moelink.engine.models.moe_decoder import MoEDecoderForCausalLM
from moelink.kernels.ops import ReferenceKernels
from moelink.planner.models import MLA, MODELS, ModelShape


def _hf_config(shape: ModelShape):
    """The config.json transformers writes for this shape (its own config classes)."""
    a = shape.attention
    common = dict(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.num_layers,
                  num_attention_heads=a.num_heads, num_experts_per_tok=shape.top_k, max_position_embeddings=4096,
                  tie_word_embeddings=False)
    if isinstance(a, MLA):
        from transformers import DeepseekV3Config

        cfg = DeepseekV3Config(**common, num_key_value_heads=a.num_heads, intermediate_size=shape.dense_intermediate,
                               moe_intermediate_size=shape.moe_intermediate, n_shared_experts=shape.num_shared,
                               n_routed_experts=shape.num_experts, n_group=shape.n_group,
                               topk_group=shape.topk_group, first_k_dense_replace=shape.first_dense,
                               q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_dim,
                               qk_rope_head_dim=a.qk_rope_dim, v_head_dim=a.v_dim)
        cfg.architectures = ["DeepseekV3ForCausalLM"]
    elif shape.name.startswith("qwen3"):
        from transformers import Qwen3MoeConfig

        cfg = Qwen3MoeConfig(**common, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
                             intermediate_size=shape.dense_intermediate, moe_intermediate_size=shape.moe_intermediate,
                             num_experts=shape.num_experts)
        cfg.architectures = ["Qwen3MoeForCausalLM"]
    else:
        from transformers import MixtralConfig

        cfg = MixtralConfig(**common, num_key_value_heads=a.num_kv_heads, head_dim=a.head_dim,
                            intermediate_size=shape.moe_intermediate, num_local_experts=shape.num_experts)
        cfg.architectures = ["MixtralForCausalLM"]
    assert shape.first_dense == 0 or isinstance(a, MLA), "a dense-first GQA shape needs its own config here"
    return cfg


@pytest.mark.parametrize("name", ["deepseek-v3", "kimi-k2", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_planner_shapes_match_the_engine_model(name, tmp_path):
    shape = MODELS[name]
    _hf_config(shape).save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path), dtype="bfloat16")
    model = MoEDecoderForCausalLM(cfg, arch_spec(cfg.architecture), ReferenceKernels(), torch.device("meta"))
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    vectors = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    assert matrices == shape.total_params(), (name, matrices, shape.total_params())
    assert vectors < 1e-5 * matrices  # what the planner leaves out is noise
    assert kv_sizing.kv_cache_bytes_per_token_per_layer(cfg) == shape.kv_elems_per_token() * 2  # bf16
    if name == "deepseek-v3":  # the published size: 671B without the MTP module
        assert round(matrices / 1e9) == 671


@pytest.mark.parametrize("name", ["deepseek-v3", "qwen3-30b-a3b"])
@pytest.mark.parametrize("precision", ["fp8", "bf16"])
def test_planner_weight_bytes_per_rank_equal_the_engine(name, precision, tmp_path):
    """`moelink plan --precision` prices a rank's weights as the engine holds them (EP 8, two redundant
    experts): both count with planner.weight_bytes, matrix by matrix; the planner leaves out only vectors."""
    from moelink.engine.rank.weight_memory import weight_bytes_by_format
    from moelink.moe.layer import ExpertParallel
    from moelink.moe.placement import ExpertPlacement
    from moelink.planner.plan import PRECISIONS
    from moelink.planner.step_model import Setup, weights_per_rank_bytes

    shape = MODELS[name]
    _hf_config(shape).save_pretrained(tmp_path)
    cfg = ModelConfig.from_pretrained(str(tmp_path), dtype="bfloat16",
                                      quantization="fp8" if precision == "fp8" else None)
    placement = ExpertPlacement(shape.num_experts, 8, num_redundant=8)  # one extra slot per rank
    ep = ExpertParallel(0, 8, placement, None, None)
    model = MoEDecoderForCausalLM(cfg, arch_spec(cfg.architecture), ReferenceKernels(), torch.device("meta"), ep)
    model.process_weights_after_loading()  # MLA's kv_b_proj: FP8 on disk, held in bf16
    engine = sum(weight_bytes_by_format(model).values())
    vectors = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() < 2)
    plan = weights_per_rank_bytes(shape, Setup(ep=8, precision=PRECISIONS[precision], redundant_experts=8))
    assert plan == pytest.approx(engine - vectors, rel=1e-12)
