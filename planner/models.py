"""The cluster model's registry of MoE shapes (`MODELS`, `get_model`): the rows up to 2025 here, those of 2026 in
planner/models_2026.py; from the public config.json values (transformers' config defaults, which name their
checkpoint). The shape is planner/model_shape.ModelShape, its attention kinds planner/attention_kinds.py and
planner/sparse_kinds.py (re-exported here).
"""
from __future__ import annotations

from dataclasses import replace

from .attention_kinds import DSA, GQA, MLA, CompressedMQA, LinearAttention, SlidingWindow
from .model_shape import ModelShape
from .models_2026 import ROWS_2026
from .sparse_kinds import QSA, BlockSparse, HyperConnections, NgramTables

__all__ = ["DSA", "GQA", "MLA", "MODELS", "QSA", "BlockSparse", "CompressedMQA", "HyperConnections",
           "LinearAttention", "ModelShape", "NgramTables", "SlidingWindow", "get_model"]

_DS_MLA = MLA(num_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_dim=128, qk_rope_dim=64, v_dim=128)

MODELS = {
    m.name: m
    for m in (
        ModelShape("deepseek-v3", num_layers=61, first_dense=3, hidden=7168, dense_intermediate=18432,
                   attention=_DS_MLA, num_experts=256, num_shared=1, top_k=8, moe_intermediate=2048,
                   vocab=129280, n_group=8, topk_group=4, mtp_layers=1),
        ModelShape("kimi-k2", num_layers=61, first_dense=1, hidden=7168, dense_intermediate=18432,
                   attention=MLA(64, 1536, 512, 128, 64, 128), num_experts=384, num_shared=1, top_k=8,
                   moe_intermediate=2048, vocab=163840),
        ModelShape("qwen3-235b-a22b", num_layers=94, first_dense=0, hidden=4096, dense_intermediate=12288,
                   attention=GQA(64, 4, 128), num_experts=128, num_shared=0, top_k=8, moe_intermediate=1536,
                   vocab=151936),
        ModelShape("qwen3-30b-a3b", num_layers=48, first_dense=0, hidden=2048, dense_intermediate=6144,
                   attention=GQA(32, 4, 128), num_experts=128, num_shared=0, top_k=8, moe_intermediate=768,
                   vocab=151936),
        ModelShape("mixtral-8x22b", num_layers=56, first_dense=0, hidden=6144, dense_intermediate=16384,
                   attention=GQA(48, 8, 128), num_experts=8, num_shared=0, top_k=2, moe_intermediate=16384,
                   vocab=32768),
        ModelShape("mixtral-8x7b", num_layers=32, first_dense=0, hidden=4096, dense_intermediate=14336,
                   attention=GQA(32, 8, 128), num_experts=8, num_shared=0, top_k=2, moe_intermediate=14336,
                   vocab=32000),
    )
}
MODELS["deepseek-r1"] = MODELS["deepseek-v3"]  # same architecture and shapes
# DeepSeek-V3.2 (-Exp): V3's shapes with a lightning indexer per layer (64 heads of 128, top-2048). GLM-5: 78 layers of
# MLA (64 heads, nope 192, v 256, q LoRA 2048) with a 32-head indexer; every layer counted with its own indexer (its
# "shared" layers, which reuse a previous layer's selection, would read fewer index keys).
MODELS["deepseek-v3.2"] = replace(MODELS["deepseek-v3"], name="deepseek-v3.2", dsa=DSA(64, 128, 2048))
MODELS["glm-5"] = ModelShape("glm-5", num_layers=78, first_dense=3, hidden=6144, dense_intermediate=12288,
                             attention=MLA(64, 2048, 512, 192, 64, 256), num_experts=256, num_shared=1, top_k=8,
                             moe_intermediate=2048, vocab=154880, mtp_layers=1, dsa=DSA(32, 128, 2048))
# Kimi K2 Thinking / K2.5 (the text model: K2's shapes; K2.5's vision tower, ~0.4B, is not loaded by moelink): the
# shapes of kimi-k2, published with INT4 routed experts (plan with --precision int4).
for _name in ("kimi-k2.5", "kimi-k2-thinking"):
    MODELS[_name] = replace(MODELS["kimi-k2"], name=_name)

# DeepSeek-V4 (issue 45; engine/models/compressed_attention_config.py). Shapes from transformers 5.24's DeepseekV4Config
# docstring (heads, head_dim 512, o_groups, o_lora_rank) and the public model cards (V4-Flash: 43 layers, hidden
# 4096, 256 experts of 2048, top-6, q LoRA 1024, layers 0-1 window only then CSA / HCA alternating from CSA, index
# top-512; V4-Pro: 61 layers, hidden 7168, 384 experts of 3072, q LoRA 1536, layers 0-1 HCA then HCA / CSA
# alternating, index top-1024); both: one shared expert, every layer MoE (the first 3 hash-routed: no router GEMM,
# the same expert work), window 128, one MTP layer. Their totals match the cards' 284B / 1.6T (tests/planner:
# test_rows_match_published_sizes).
MODELS["deepseek-v4-flash"] = ModelShape(
    "deepseek-v4-flash", num_layers=43, first_dense=0, hidden=4096, dense_intermediate=0,
    attention=CompressedMQA(64, 512, 1024, o_groups=8, o_lora_rank=1024, window=128, sliding_layers=2, csa_layers=21,
                            hca_layers=20, topk=512),
    num_experts=256, num_shared=1, top_k=6, moe_intermediate=2048, vocab=129280, mtp_layers=1)
MODELS["deepseek-v4-pro"] = ModelShape(
    "deepseek-v4-pro", num_layers=61, first_dense=0, hidden=7168, dense_intermediate=0,
    attention=CompressedMQA(128, 512, 1536, o_groups=16, o_lora_rank=1024, window=128, sliding_layers=0,
                            csa_layers=29, hca_layers=32, topk=1024),
    num_experts=384, num_shared=1, top_k=6, moe_intermediate=3072, vocab=129280, mtp_layers=1)

# The hybrids and LongCat-Flash (issue 57), from their published config.json values (transformers 5.24's configs
# default to them; `auto_docstring(checkpoint=...)` names each). Qwen3-Next-80B-A3B: 48 layers, 36 gated DeltaNet
# (32 value / 16 key heads of 128) and 12 GQA (16 heads, 2 KV, 256; its output gate's extra q half left out), 512
# experts of 512 top-10 and one shared, one MTP layer. Kimi-Linear-48B-A3B: 27 layers, 21 KDA (32 heads of 128,
# per-channel decay and output gate each through rank 128) and 6 MLA (32 heads, no q LoRA), the first dense.
# LongCat-Flash: 28 layers of two MLA + dense-FFN sublayers beside one MoE (512 experts of 2048 top-12, 256
# zero-computation ones), one MTP layer. Totals and active counts against the model cards in tests/planner
# (test_planner_hybrids.py).
MODELS["qwen3-next-80b-a3b"] = ModelShape(
    "qwen3-next-80b-a3b", num_layers=48, first_dense=0, hidden=2048, dense_intermediate=5632,
    attention=GQA(16, 2, 256), num_experts=512, num_shared=1, top_k=10, moe_intermediate=512, vocab=151936,
    mtp_layers=1, linear=LinearAttention(layers=36, num_heads=32, num_k_heads=16, head_k_dim=128, head_v_dim=128))
MODELS["kimi-linear-48b-a3b"] = ModelShape(
    "kimi-linear-48b-a3b", num_layers=27, first_dense=1, hidden=2304, dense_intermediate=9216,
    attention=MLA(32, 0, 512, 128, 64, 128), num_experts=256, num_shared=1, top_k=8, moe_intermediate=1024,
    vocab=163840, linear=LinearAttention(layers=21, num_heads=32, num_k_heads=32, head_k_dim=128, head_v_dim=128,
                                         gate_rank=128, decay_per_channel=True, decay_rank=128))
MODELS["longcat-flash"] = ModelShape(
    "longcat-flash", num_layers=28, first_dense=0, hidden=6144, dense_intermediate=12288,
    attention=MLA(64, 1536, 512, 128, 64, 128), num_experts=512, num_shared=0, top_k=12,
    moe_intermediate=2048, vocab=131072, mtp_layers=1, zero_experts=256, sublayers=2, dense_beside_moe=2)

MODELS.update({m.name: m for m in ROWS_2026})


def get_model(name: str) -> ModelShape:
    """Model by name; a ValueError lists the known names."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is not known: choose from {', '.join(sorted(MODELS))}.")
    return MODELS[name]
