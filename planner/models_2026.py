"""The cluster model's rows for the families of 2026 that moelink serves (issue 57), and three of 2025 it served
without a row (MiniMax-M2, MiMo-V2-Flash, gpt-oss-120b); planner/models.py adds them to `MODELS`.

Every number is a default of transformers 5.24's config class for the family (`auto_docstring(checkpoint=...)` names
the checkpoint), read as moelink's own config reader reads it (engine/models/<family>/config.py and reader.py).
Where the defaults leave a published value out, the row says so and what it counts instead; totals are checked
against the model cards where they publish one, else against the config's own arithmetic
(tests/planner/test_planner_families_2026.py).
"""
from __future__ import annotations

from .attention_kinds import DSA, GQA, MLA, LinearAttention, SlidingWindow
from .model_shape import ModelShape
from .sparse_kinds import BlockSparse, HyperConnections, NgramTables

ROWS_2026 = (
    # EXAONE-MoE (ExaoneMoeConfig, checkpoint LGAI-EXAONE/K-EXAONE-236B-A23B). The class's defaults are NOT that
    # checkpoint's sizes (they make a ~29B model, not 236B): the row is the defaults, named for the family. 32 layers,
    # the first dense (16384), GQA 32 x 32 kv heads of 128, "LLLG": 24 sliding layers (window 4096) and 8 full, 64
    # experts of 1024 top-8 and one shared.
    ModelShape("exaone-moe", num_layers=32, first_dense=1, hidden=4096, dense_intermediate=16384,
               attention=GQA(32, 32, 128), num_experts=64, num_shared=1, top_k=8, moe_intermediate=1024, vocab=102400,
               sliding=SlidingWindow(layers=24, window=4096)),
    # Ling hybrid (BailingHybridConfig, inclusionAI/Ling-3.0-Flash): 42 layers in groups of 6, KDA on 5 (35: 32 heads
    # of 128, full-rank per-channel decay f_proj and output gate g_proj) and MLA on the 6th (7: 32 heads, no q LoRA,
    # a per-head gate g_proj), the first 2 dense (6144), 512 experts of 768 top-8 in 8 groups (top 4) and one
    # shared, one MTP layer.
    ModelShape("ling-3.0-flash", num_layers=42, first_dense=2, hidden=2560, dense_intermediate=6144,
               attention=MLA(32, 0, 512, 128, 64, 128, gate_out=32), num_experts=512, num_shared=1, top_k=8,
               moe_intermediate=768, vocab=157184, n_group=8, topk_group=4, mtp_layers=1,
               linear=LinearAttention(layers=35, num_heads=32, num_k_heads=32, head_k_dim=128, head_v_dim=128,
                                      decay_per_channel=True)),
    # Hunyuan Hy4 (HYV4Config, tencent/Hy4-preview): 34 layers of MLA (32 heads, q LoRA 1536, nope 192, v 256) with
    # sinks and an element-wise output gate (hidden to 32 x 256), DSA (16 heads of 128, top-2048) whose indexer runs
    # on layers 0, 1, 5, ..., 33 (10) and is "shared" on the other 24, iHC hyper-connections over 4 streams; the first
    # layer dense (6912), 256 experts of 768 top-8 and one shared. Its MTP layers' count is not in the defaults (0).
    ModelShape("hy4-preview", num_layers=34, first_dense=1, hidden=2816, dense_intermediate=6912,
               attention=MLA(32, 1536, 512, 192, 64, 256, gate_out=32 * 256), num_experts=256, num_shared=1,
               top_k=8, moe_intermediate=768, vocab=120832, dsa=DSA(16, 128, 2048, shared_layers=24),
               hyper=HyperConnections(4, "independent")),
    # GLM-5.3-Flash (Glm5NextTextConfig, zai-org/GLM-5.3-Flash; the text model, its vision tower not loaded): 45
    # layers, KDA on 34 (64 heads of 128, decay and gate through rank 128) and NoPE MLA on every 4th (11: 64 heads,
    # q LoRA 1536, nope 256, v 256) with GLM-5's indexer (32 heads of 128, top-2048) over pools of 16 tokens, every
    # indexer "full"; mHC hyper-connections over 4 streams; the first 3 dense (12288), 288 experts of 2048 top-8 and
    # one shared.
    ModelShape("glm-5.3-flash", num_layers=45, first_dense=3, hidden=4096, dense_intermediate=12288,
               attention=MLA(64, 1536, 512, 256, 0, 256), num_experts=288, num_shared=1, top_k=8,
               moe_intermediate=2048, vocab=154880, dsa=DSA(32, 128, 2048, kpool=16),
               linear=LinearAttention(layers=34, num_heads=64, num_k_heads=64, head_k_dim=128, head_v_dim=128,
                                      gate_rank=128, decay_per_channel=True, decay_rank=128),
               hyper=HyperConnections(4, "mhc")),
    # MiniMax-M3 (MiniMaxM3VLTextConfig, MiniMaxAI/MiniMax-M3; the text model): 60 layers of GQA (64 heads, 4 kv, 128),
    # 128 experts of 3072 top-4 and a shared expert of 3072, every MLP sparse (the defaults' mlp_layer_types). The
    # block indexer's sizes are the defaults (4 heads of 128, blocks of 128, top-16 blocks, 1 local); which layers are
    # sparse is not (the checkpoint's sparse_attention_config.sparse_attention_freq; the defaults make every layer
    # full_attention): the row counts all 60 sparse, the kind's bound; replace(indexer=...) with the published
    # schedule's count.
    ModelShape("minimax-m3", num_layers=60, first_dense=0, hidden=6144, dense_intermediate=12288,
               attention=GQA(64, 4, 128), num_experts=128, num_shared=1, top_k=4, moe_intermediate=3072,
               vocab=200064, indexer=BlockSparse(layers=60, index_heads=4, index_head_dim=128, block_size=128,
                                                 topk_blocks=16, local_blocks=1)),
    # Qwen3.8-Flash-Next (Qwen4ExpTextConfig, Qwen/Qwen4-Exp; the text model): 40 layers, gated DeltaNet on 30 (32
    # value / 16 key heads of 128) and gated GQA on every 4th (10: 16 heads, 2 kv, 256, the output gate as wide as
    # q), gated hyper-connections over 4 streams (rank 320), 512 experts of 512 top-10 and a shared one of 512.
    # Not in the defaults: QSA's sizes (indexer_* are None: the row's 10 layers are priced dense; QSA is
    # planner/sparse_kinds.QSA, set with replace(indexer=QSA(...)) from the checkpoint's config.json) and
    # ple_layer_ids. transformers' comments give the n-gram tables ~45B parameters (~95 GiB); one PLE layer at the
    # defaults (3-grams, 8 heads per order: 16 heads of ~20M rows of 2048 / 16) is 41B: the row counts one PLE layer,
    # its tables in host memory (the engine's `placement` "host").
    ModelShape("qwen3.8-flash-next", num_layers=40, first_dense=0, hidden=2048, dense_intermediate=0,
               attention=GQA(16, 2, 256, gate=True), num_experts=512, num_shared=1, top_k=10, moe_intermediate=512,
               vocab=248320,
               linear=LinearAttention(layers=30, num_heads=32, num_k_heads=16, head_k_dim=128, head_v_dim=128),
               hyper=HyperConnections(4, "gated", rank=320),
               ngram=NgramTables(layers=1, ngram_size=3, heads_per_ngram=8, vocab_base=20_000_000, embed_dim=2048,
                                 key_out=4 * 2048, placement="host")),
    # MiniMax-M2 (MiniMaxM2Config's defaults: 62 layers, GQA 48 heads / 8 kv of 128, 256 experts of 1536 top-8, no
    # shared expert); the model card: 230B total, 10B active.
    ModelShape("minimax-m2", num_layers=62, first_dense=0, hidden=3072, dense_intermediate=0,
               attention=GQA(48, 8, 128), num_experts=256, num_shared=0, top_k=8, moe_intermediate=1536,
               vocab=200064),
    # MiMo-V2-Flash (MiMoV2FlashConfig, XiaomiMiMo/MiMo-V2-Flash): 48 layers, GQA 64 heads / 4 kv, q and k 192 wide,
    # values 128; full attention on layers 0, 5, 11, ..., 47 (9), a window of 129 positions (128 and the query) on the
    # other 39, which transformers builds with twice the kv heads (8; engine/models/mimo_v2_flash/reader.py); the
    # first layer dense (16384), 256 experts of 2048 top-8, no shared expert; the card: 309B total, 15B active.
    ModelShape("mimo-v2-flash", num_layers=48, first_dense=1, hidden=4096, dense_intermediate=16384,
               attention=GQA(64, 4, 192, v_head_dim=128), num_experts=256, num_shared=0, top_k=8,
               moe_intermediate=2048, vocab=152576, sliding=SlidingWindow(layers=39, window=129, num_kv_heads=8)),
    # gpt-oss-120b (GptOssConfig's defaults are the 120b's shapes, though it names gpt-oss-20b): 36 layers of GQA (64
    # heads, 8 kv, 64), alternating sliding (window 128, 18) and full, 128 experts of 2880 top-4; the card: 117B
    # total, 5.1B active. Biases and sinks left out (vectors).
    ModelShape("gpt-oss-120b", num_layers=36, first_dense=0, hidden=2880, dense_intermediate=0,
               attention=GQA(64, 8, 64), num_experts=128, num_shared=0, top_k=4, moe_intermediate=2880,
               vocab=201088, sliding=SlidingWindow(layers=18, window=128)),
)
