"""The cluster model's rows for the 2026 families (planner/models_2026.py) and their kinds (planner/sparse_kinds.py,
pooled and shared DSA in planner/attention_kinds.py): each row's total against transformers' own model of the same
config built on the meta device (and the model cards' totals where published), KV and state bytes per token and
sequence worked out, decode steps that read the sparse selection, not the whole context, and `moelink plan` on each."""
from __future__ import annotations

from dataclasses import replace

import pytest

from moelink.engine.api import plan_cli
from moelink.planner.hardware import get_profile
from moelink.planner.models import DSA, GQA, MODELS, QSA, BlockSparse, HyperConnections, ModelShape, NgramTables
from moelink.planner.step_model import Setup, decode_step, kv_bytes_per_sequence, weights_per_rank_bytes

NEW = ["exaone-moe", "ling-3.0-flash", "hy4-preview", "glm-5.3-flash", "minimax-m3", "qwen3.8-flash-next",
       "minimax-m2", "mimo-v2-flash", "gpt-oss-120b"]
M3, Q38, GLM53, HY4 = MODELS["minimax-m3"], MODELS["qwen3.8-flash-next"], MODELS["glm-5.3-flash"], MODELS["hy4-preview"]
# QSA's sizes are not in transformers' defaults (indexer_* None): values for the tests only, not published ones.
QSA_TEST = QSA(layers=10, index_heads=16, index_head_dim=256, budget=2048, compress_ratio=64)
Q38_QSA = replace(Q38, name="qwen3.8-qsa-test", indexer=QSA_TEST)
HW = get_profile("h200-hgx")


@pytest.mark.parametrize("model, total, active, rel_active", [
    ("minimax-m2", 230e9, 10e9, 0.05),     # MiniMax-M2: 230B total, 10B active
    ("mimo-v2-flash", 309e9, 15e9, 0.05),  # MiMo-V2-Flash: 309B, 15B active
    ("gpt-oss-120b", 117e9, 5.1e9, 0.03),  # gpt-oss-120b: 117B, 5.1B active
])
def test_rows_match_published_sizes(model, total, active, rel_active):
    assert MODELS[model].total_params() == pytest.approx(total, rel=0.01)
    assert MODELS[model].active_params() == pytest.approx(active, rel=rel_active)


# (row, transformers config class, model class, config overrides): the overrides give transformers what the row counts
# beyond its defaults (MiniMax-M3: every layer sparse; Qwen3.8: one PLE layer and the test QSA sizes).
_META = [
    ("exaone-moe", "ExaoneMoeConfig", "ExaoneMoeForCausalLM", {}, MODELS["exaone-moe"]),
    ("ling-3.0-flash", "BailingHybridConfig", "BailingHybridForCausalLM", {}, MODELS["ling-3.0-flash"]),
    ("hy4-preview", "HYV4Config", "HYV4ForCausalLM", {}, HY4),
    ("glm-5.3-flash", "Glm5NextTextConfig", "Glm5NextTextModel", {}, GLM53),
    ("minimax-m3", "MiniMaxM3VLTextConfig", "MiniMaxM3VLForCausalLM", {"layer_types": ["minimax_m3_sparse"] * 60}, M3),
    ("qwen3.8-flash-next", "Qwen4ExpTextConfig", "Qwen4ExpForCausalLM",
     {"ple_layer_ids": [1], "eos_token_id": 1, "indexer_n_heads": 16, "indexer_kv_heads": 1, "indexer_head_dim": 256,
      "indexer_budget": 2048, "indexer_compress_ratio": 64}, Q38_QSA),
    ("minimax-m2", "MiniMaxM2Config", "MiniMaxM2ForCausalLM", {}, MODELS["minimax-m2"]),
    ("mimo-v2-flash", "MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", {}, MODELS["mimo-v2-flash"]),
    ("gpt-oss-120b", "GptOssConfig", "GptOssForCausalLM", {}, MODELS["gpt-oss-120b"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, config_cls, model_cls, overrides, row", _META, ids=[m[0] for m in _META])
def test_row_totals_equal_transformers_models_of_the_defaults(name, config_cls, model_cls, overrides, row):
    # transformers' own model of its config defaults, on the meta device (no memory): its parameter count is the
    # config's arithmetic. The rows leave out norms, biases, sinks, convolutions and A_log / dt_bias vectors, and
    # MiMo-V2-Flash's sliding layers' sinks and attention vectors: within 0.1%.
    torch = pytest.importorskip("torch")
    import transformers

    cfg = getattr(transformers, config_cls)(**overrides)
    with torch.device("meta"):
        model = getattr(transformers, model_cls)(cfg)
    n = sum(p.numel() for p in model.parameters())
    if model_cls == "Glm5NextTextModel":  # the text model alone has no LM head (it is the wrapper's)
        n += cfg.vocab_size * cfg.hidden_size
    assert row.total_params() == pytest.approx(n, rel=1e-3)


# What the engine caches per token beyond the planner's figure: its paged cache holds the sliding layers' K and V per
# token too (on one block table; gpt-oss frees blocks past the window, the planner prices the window), and
# GLM-5.3-Flash's NoPE MLA is held with a zero rope part (64 values, MLAConfig.rope_in_checkpoint).
_ENGINE_EXTRA_KV = {"exaone-moe": 24 * 2 * 32 * 128, "mimo-v2-flash": 39 * 8 * (192 + 128),
                    "gpt-oss-120b": 18 * 2 * 8 * 64, "glm-5.3-flash": 11 * 64}


@pytest.mark.slow
@pytest.mark.parametrize("name, config_cls, model_cls, overrides, row", _META, ids=[m[0] for m in _META])
def test_rows_match_the_engine_model_of_the_same_config(name, config_cls, model_cls, overrides, row, tmp_path):
    # The config.json transformers writes for its defaults, read by moelink's own reader (engine/models/<family>/),
    # its decoder built on the meta device: the weight matrices it holds add up to the row's total (GLM-5.3-Flash:
    # +0.03%, the zero rope parts of q_b / kv_a it holds), its KV bytes per token to the row's (plus _ENGINE_EXTRA_KV)
    # and its per-sequence state pools to the row's linear-attention and PLE state (the sliding windows are in its
    # paged cache, not in a state pool).
    torch = pytest.importorskip("torch")
    import transformers

    from moelink.engine.config import kv_sizing
    from moelink.engine.config.model import ModelConfig
    from moelink.engine.models.moe_decoder import MoEDecoderForCausalLM
    from moelink.engine.models.registry import arch_spec
    from moelink.kernels.ops import ReferenceKernels

    cfg = getattr(transformers, config_cls)(**overrides)
    cfg.architectures = [model_cls.replace("Glm5NextTextModel", "Glm5NextForCausalLM")]
    cfg.save_pretrained(tmp_path)
    mc = ModelConfig.from_pretrained(str(tmp_path), dtype="bfloat16")
    model = MoEDecoderForCausalLM(mc, arch_spec(mc.architecture), ReferenceKernels(), torch.device("meta"))
    matrices = sum(p.numel() for p in model.parameters() if p.dim() >= 2)
    assert matrices == pytest.approx(row.total_params(), rel=5e-4)
    assert kv_sizing.kv_cache_bytes_per_token(mc) == (row.kv_elems_per_token() * row.num_layers
                                                      + _ENGINE_EXTRA_KV.get(name, 0)) * 2
    window = (row.sliding.layers * row.sliding.window * row._kv_elems_per_block() * row._sliding_kv_scale() * 2
              if row.sliding else 0)
    assert kv_sizing.state_bytes_per_sequence(mc) == row.state_bytes_per_sequence(2) - window


def test_config_arithmetic_of_exaone_by_hand():
    # ExaoneMoeConfig's defaults (not K-EXAONE-236B's sizes: the defaults make a 28.6B model).
    m = MODELS["exaone-moe"]
    attn = 4 * 4096 * 32 * 128  # q, k, v (32 kv heads), o
    moe = 65 * 3 * 4096 * 1024 + 4096 * 64  # 64 routed + 1 shared, router
    total = 32 * attn + 3 * 4096 * 16384 + 31 * moe + 2 * 102400 * 4096
    assert m.total_params() == total
    assert m.active_params() == 32 * attn + 3 * 4096 * 16384 + 31 * 9 * 3 * 4096 * 1024 + 102400 * 4096


def test_kv_and_state_bytes_per_token_and_sequence():
    # Values cached per token, all layers (x 2 bytes in bf16):
    # MiniMax-M3: 60 block-sparse layers of K and V (4 kv heads of 128) and the index key (128).
    assert M3.kv_elems_per_token() * 60 == 60 * (2 * 4 * 128 + 128)
    # GLM-5.3-Flash: 11 NoPE MLA layers, latent 512 (no rope part) and the pooled indexer's [key | gate] (2 x 128);
    # its 34 KDA layers keep a float32 64 x 128 x 128 state and 3 conv rows of q, k, v (bf16) per sequence.
    assert GLM53.kv_elems_per_token() * 45 == 11 * (512 + 2 * 128)
    assert GLM53.state_bytes_per_sequence(2) == 34 * (64 * 128 * 128 * 4 + 3 * 3 * 64 * 128 * 2)
    # Hy4: 34 MLA layers (512 + 64), the index key (128) on the 10 layers with an indexer of their own only.
    assert HY4.kv_elems_per_token() * 34 == 34 * (512 + 64) + 10 * 128
    # Qwen3.8 with QSA: 10 layers of K and V (2 kv heads of 256) and QSA's raw and block key rows (2 x 256);
    # 30 gated DeltaNet layers' state (32 x 128 x 128 float32, conv rows of q, k (16 x 128 each) and v (32 x 128)).
    assert Q38_QSA.kv_elems_per_token() * 40 == 10 * (2 * 2 * 256 + 2 * 256)
    assert Q38.kv_elems_per_token() * 40 == 10 * 2 * 2 * 256  # the published row: QSA sizes unknown, dense
    # ... and its PLE layer's dilated conv rows ((4 - 1) x 3 of 4 x 2048 channels, bf16) and last 2 token ids (int64).
    assert Q38.state_bytes_per_sequence(2) == (30 * (32 * 128 * 128 * 4 + 3 * (2 * 16 * 128 + 32 * 128) * 2)
                                              + 9 * 8192 * 2 + 2 * 8)
    # EXAONE-MoE: 8 full layers per token (32 kv heads of 128), 24 sliding layers a window of 4096 per sequence.
    ex = MODELS["exaone-moe"]
    assert ex.kv_elems_per_token() * 32 == 8 * 2 * 32 * 128
    assert ex.state_bytes_per_sequence(2) == 24 * 4096 * 2 * 32 * 128 * 2
    # MiMo-V2-Flash: K 192 and V 128 wide, 9 full layers (4 kv heads), 39 of a 129-position window (8 kv heads).
    mimo = MODELS["mimo-v2-flash"]
    assert mimo.kv_elems_per_token() * 48 == 9 * 4 * (192 + 128)
    assert mimo.state_bytes_per_sequence(2) == 39 * 129 * 8 * (192 + 128) * 2
    # Ling: 7 MLA layers (512 + 64); gpt-oss-120b: 18 full layers of 8 kv heads of 64, 18 of a 128-token window.
    assert MODELS["ling-3.0-flash"].kv_elems_per_token() * 42 == 7 * 576
    gpt = MODELS["gpt-oss-120b"]
    assert gpt.kv_elems_per_token() * 36 == 18 * 2 * 8 * 64
    assert gpt.state_bytes_per_sequence(2) == 18 * 128 * 2 * 8 * 64 * 2


def test_block_sparse_decode_reads_the_selection():
    # Per layer at 131,072 tokens: every index key (128 values) and K, V of the top 16 blocks of 128 (2,048 tokens,
    # 1,024 values each) against K, V of every token dense.
    keys = 131072
    f, e = M3.attention_work(keys, True)
    assert e == pytest.approx(keys * 128 + 2048 * 1024)
    per_key = 2 * 64 * (128 + 128)  # QK and PV, 64 heads of 128
    assert f == pytest.approx(keys * 2 * 4 * 128 + 2048 * per_key)
    # Past the selection, each further token adds its index key only.
    assert M3.attention_work(2 * keys, True)[1] - e == pytest.approx(keys * 128)
    # A context within the top blocks reads everything (dense).
    assert M3.attention_work(1000, True)[1] == pytest.approx(1000 * (128 + 1024))
    dense = replace(M3, name="m3-dense", indexer=None)
    s = Setup(ep=16, batch_per_rank=32, context_len=keys)
    sparse_core = decode_step(M3, HW, s).breakdown["attn_core"]
    assert sparse_core < decode_step(dense, HW, s).breakdown["attn_core"] / 4
    # KV grows by the index key: 1,152 values a token instead of 1,024.
    assert kv_bytes_per_sequence(M3, s, keys) / kv_bytes_per_sequence(dense, s, keys) == pytest.approx(1152 / 1024)


def test_qsa_decode_reads_block_keys_and_the_budget():
    # Per QSA layer: the complete blocks' keys (keys / 64 rows of 256) and K, V of at most 2048 + 63 tokens.
    keys = 131072
    ix_f, ix_e = QSA_TEST.work(keys, 2 * 16 * (256 + 256), 2 * 2 * 256)
    assert ix_e == pytest.approx(keys / 64 * 256 + 2111 * 1024)
    assert ix_f == pytest.approx(keys / 64 * 2 * 16 * 256 + 2111 * 2 * 16 * 512)
    f, e = Q38_QSA.attention_work(keys, True)
    lin = 30 * 8 * 32 * 128 * 128  # the DeltaNet layers' per-token state work
    assert e * 40 == pytest.approx(10 * ix_e)
    assert f * 40 == pytest.approx(10 * ix_f + lin)
    s = Setup(ep=8, batch_per_rank=64, context_len=keys)
    assert decode_step(Q38_QSA, HW, s).breakdown["attn_core"] < decode_step(Q38, HW, s).breakdown["attn_core"] / 2


def test_pooled_dsa_reads_every_row_scores_pools_and_attends_the_width():
    # GLM-5.3-Flash per MLA layer: every token's [key | gate] row (256), one pooled key per 16 tokens scored by 32
    # heads of 128, attention over topk + kpool - 1 = 2,063 latents (512: NoPE, no rope part).
    keys = 131072
    full_f, full_e = GLM53._block_attention_work(keys, True)
    per_key = 2 * 64 * 512 + 2 * 64 * 512  # absorbed decode: QK over the latent, PV over it
    assert full_e == pytest.approx(2063 * 512 + keys * 256)
    assert full_f == pytest.approx(2063 * per_key + keys / 16 * 2 * 32 * 128)
    # Hy4's shared layers score nothing and read no index key: the mean over its 34 DSA layers, 10 of them own.
    h_f, h_e = HY4._block_attention_work(keys, True)
    assert h_e == pytest.approx(2048 * 576 + 10 / 34 * keys * 128)
    unshared = replace(HY4, name="hy4-unshared", dsa=DSA(16, 128, 2048))
    assert unshared._block_attention_work(keys, True)[1] == pytest.approx(2048 * 576 + keys * 128)
    assert HY4.total_params() < unshared.total_params()  # 24 layers' indexer weights fewer


def test_hyper_connections_and_ngram_tables_weights():
    # Qwen3.8's gated mixer: per block down [320, 4 x 2048] and up [4 x 2048, 320], the injection [4, 4 x 2048];
    # two blocks a layer and the head's mixer (down and up).
    hc = Q38.hyper
    assert hc is not None
    assert hc.params(2048, 40) == 81 * 2 * 320 * 8192 + 80 * 4 * 8192
    # GLM-5.3's mHC: fn [(2 + 4) x 4, 4 x 4096] per block; Hy4's iHC: [2 x 4, 4 x 2816] per block, [4, 4 x 2816] head.
    assert HyperConnections(4, "mhc").params(4096, 45) == 90 * 24 * 16384
    assert HyperConnections(4, "independent").params(2816, 34) == 68 * 8 * 11264 + 4 * 11264
    # One PLE layer's tables: 16 heads of ~20M rows of 128 = 20M x 2048 = 41B weights, ~82 GB in bf16, in host memory:
    # a rank holds none of it; a token copies 2,048 bf16 values (4 KiB) from the host.
    g = Q38.ngram
    assert g is not None and g.heads == 16 and g.table_params() == 20_000_000 * 2048
    assert g.host_bytes_per_token() == 2048 * 2
    s = Setup(ep=8)
    on_device = replace(Q38, name="q38-ngram-device", ngram=replace(g, placement="device"))
    held = weights_per_rank_bytes(on_device, s) - weights_per_rank_bytes(Q38, s)
    assert held == pytest.approx(20_000_000 * 2048 * 2)  # bf16, every rank a copy
    assert replace(g, placement="device").host_bytes_per_token() == 0
    # The hyper-connections' float32 weights are held on every rank.
    no_hc = replace(Q38, name="q38-no-hc", hyper=None)
    assert weights_per_rank_bytes(Q38, s) - weights_per_rank_bytes(no_hc, s) == pytest.approx(hc.params(2048, 40) * 4)


def test_bad_shapes_name_the_field():
    with pytest.raises(ValueError, match="indexer layers=61 need GQA attention"):
        replace(M3, indexer=BlockSparse(61, 4, 128, 128, 16))
    with pytest.raises(ValueError, match="local_blocks=17"):
        BlockSparse(1, 4, 128, 128, 16, local_blocks=17)
    with pytest.raises(ValueError, match="budget=100 must be a multiple of compress_ratio=64"):
        QSA(1, 16, 128, 100, 64)
    with pytest.raises(ValueError, match="kpool=3 must be >= 1 and divide topk=2048"):
        DSA(32, 128, 2048, kpool=3)
    with pytest.raises(ValueError, match="shared_layers=34 must leave a full indexer"):
        replace(HY4, dsa=DSA(16, 128, 2048, shared_layers=34))
    with pytest.raises(ValueError, match="form='x'"):
        HyperConnections(4, "x")
    with pytest.raises(ValueError, match="placement='disk'"):
        NgramTables(1, 3, 8, 100, 2048, 8192, placement="disk")
    with pytest.raises(ValueError, match="indexer layers=1 need GQA attention"):
        ModelShape("x", num_layers=2, first_dense=0, hidden=8, dense_intermediate=8, attention=GLM53.attention,
                   num_experts=4, num_shared=0, top_k=2, moe_intermediate=8, vocab=16,
                   indexer=BlockSparse(1, 1, 4, 4, 1))
    assert isinstance(M3.attention, GQA)


@pytest.mark.parametrize("model", NEW)
def test_moelink_plan_prices_them(model, capsys):
    ep = 4 if model == "exaone-moe" else 8
    assert plan_cli.main(["--model", model, "--hardware", "h200-hgx", "--ep", str(ep), "--batch-per-rank", "16"]) == 0
    out = capsys.readouterr().out
    assert f"{model} on h200-hgx" in out and "output tok/s/GPU" in out
