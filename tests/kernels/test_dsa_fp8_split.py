"""DeepSeek Sparse Attention's fp8 index keys (a float32 scale per 128 values, kernels/dsa.py) and the multi-program
top-k (kernels/triton_dsa_select.py): the key layout and its write, the reference scores against the dequantized keys
in float64, and the Triton scores, selection (one program per row and split over P programs) and key write against
the references (Triton in the interpreter on CPU), at ragged shapes with ties and rows shorter than top-k."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels import dsa
from moelink.kernels.dsa import (fp8_key_row_bytes, quantize_index_keys, reference_dsa_index_scores,
                                 reference_dsa_topk, reference_write_fp8_index_keys)
from moelink.kernels.attention import AttentionMetadata

from tests.helpers.dsa_cases import (CTX_Q, L, assert_same_sets, cache_of, fp8_index_cache, meta_of, meta_to,
                                     positions)


def test_fp8_key_layout_matches_the_engine_config():
    """kernels/ imports nothing of the engine: the layout's numbers are held equal here."""
    from moelink.engine.models import dsa_config as cfg

    assert dsa.SCALE_GROUP == cfg.INDEX_SCALE_GROUP and dsa.FP8_KEY_DTYPE == cfg.INDEX_FP8_DTYPE
    for D in (12, 16, 64, 128, 130, 256):
        assert fp8_key_row_bytes(D) == cfg.index_fp8_row_bytes(D)
    assert fp8_key_row_bytes(128) == 132 and fp8_key_row_bytes(130) == 132 + 8  # 2 groups: the second of 2 values


def test_fp8_keys_round_trip_within_e4m3_and_rows_are_bytes_as_documented(gen):
    """Per 128-value group: scale = amax / 448, e4m3(key / scale) * scale within e4m3's half step (2^-4 relative) of
    the float64 key; the row is [e4m3 bytes | zero pad | float32 scales]; a padding slot (-1) writes the null block's
    zeros."""
    D = 130  # two groups, the second of 2 values, and a 2-byte pad before the scales
    k = torch.randn(5, D, generator=gen, dtype=torch.float64) * torch.tensor([1e-3, 1.0, 30.0, 300.0, 0.0],
                                                                             dtype=torch.float64)[:, None]
    k8, s = quantize_index_keys(k)
    for g0, g in ((0, 0), (128, 1)):
        part = k[:, g0: g0 + 128]
        amax = part.abs().amax(1)
        assert torch.allclose(s[:, g].double(), amax / 448, rtol=1e-6)
        back = k8[:, g0: g0 + 128].double() * s[:, g, None].double()
        assert ((back - part).abs() <= part.abs() * 2**-4 + amax[:, None] * 2**-10 + 1e-30).all()
    assert (s[4] == 0).all() and (k8[4].float() == 0).all()  # an all-zero key: scale 0, no NaN
    cache = torch.full((3, 2, fp8_key_row_bytes(D)), 7, dtype=torch.uint8)
    reference_write_fp8_index_keys(k[:2], cache, torch.tensor([3, -1]))
    row = cache.view(-1, cache.shape[2])[3]
    assert torch.equal(row[:D], k8[0].view(torch.uint8)) and (row[D:132] == 0).all()
    assert torch.equal(row[132:].view(torch.float32), s[0])
    assert (cache[2, 0] == 0).all()  # the null block's (the last's) first row: the padding token's zeros
    assert (cache[:2].view(-1, cache.shape[2])[[0, 1, 2]] == 7).all()  # no other row written


@pytest.mark.parametrize("D", [12, 16, 160], ids=["D12-pad", "D16", "D160-2groups"])
def test_reference_fp8_scores_are_the_dequantized_keys_scores(gen, D):
    """The reference's per-group dot products times the scales equal the scores of the dequantized keys (float64)."""
    meta = meta_of(gen, CTX_Q, "cpu")
    cache, _ = fp8_index_cache(gen, meta, D, "cpu")
    H = 4
    T = sum(meta.query_lens)
    q = torch.randn(T, H, D, generator=gen)
    w = torch.randn(T, H, generator=gen)
    got = reference_dsa_index_scores(q, w, cache, meta, D**-0.5)
    rows = cache.view(-1, cache.shape[2])
    k8 = rows[:, :D].contiguous().view(torch.float8_e4m3fn).double()
    off = -(-D // 4) * 4
    scales = rows[:, off:].contiguous().view(torch.float32).double()
    deq = k8 * scales.repeat_interleave(128, dim=1)[:, :D]
    for t, (s, p) in enumerate(positions(meta, "cpu")):
        slots = [int(meta.block_tables_SM[s, j // L]) * L + j % L for j in range(p + 1)]
        want = w[t].double() @ torch.relu(q[t].double() @ deq[slots].T * D**-0.5)
        torch.testing.assert_close(got[t, : p + 1].double(), want, rtol=1e-5, atol=1e-5)
        assert got[t, p + 1:].eq(float("-inf")).all()


@pytest.mark.parametrize("dtype,D", [(torch.float32, 12), (torch.bfloat16, 16), (torch.float32, 160)],
                         ids=["fp32-D12", "bf16-D16", "fp32-D160"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_triton_selection_fp8_keys_equals_reference(gen, kdev, dtype, D):
    """fp8 keys with scales: the Triton scores (per-group dots times scales) select the reference's positions, one
    program per row and split over 2-4 programs."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    meta = meta_of(gen, CTX_Q, "cpu")
    cache, _ = fp8_index_cache(gen, meta, D, "cpu")
    H, K = 16, 8
    T = sum(meta.query_lens)
    q = torch.randn(T, H, D, generator=gen).to(dtype)
    w = torch.randn(T, H, generator=gen)
    want = reference_dsa_topk(q, w, cache, meta, K, D**-0.5)
    for splits in (1, 3) if kdev.type == "cpu" else (1, 2, 3, 4):
        got = triton_dsa_topk(q.to(kdev), w.to(kdev), cache.to(kdev), meta_to(meta, kdev), K, D**-0.5, max_len=64,
                              num_splits=splits)
        assert_same_sets(got.cpu(), want)


# -- the multi-program top-k -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("splits", [2, 4, 7])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_split_topk_equals_reference_with_ties_and_short_rows(gen, kdev, splits):
    """The partial + merge top-k against the reference: scores of 4 values (many ties at the K-th value) over ragged
    rows: longer than P * K (partials selecting, a short last span at 4 and 7), between K and P * K (spans copied
    whole, programs past the row's end empty), shorter than K (every position), a single position."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    ctx_q = [(300, 1), (97, 5), (40, 1), (7, 1), (1, 1), (61, 3)]
    meta = meta_of(gen, ctx_q, "cpu")
    H, D, K = 16, 16, 12
    cache = torch.zeros(int(meta.block_tables_SM.max()) + 2, L, D)
    cache[..., 0] = torch.randint(0, 4, cache.shape[:2], generator=gen).float()
    T = sum(meta.query_lens)
    q = torch.zeros(T, H, D)
    q[..., 0] = 1.0
    w = torch.ones(T, H)
    want = reference_dsa_topk(q, w, cache, meta, K, 0.25)
    got = triton_dsa_topk(q.to(kdev), w.to(kdev), cache.to(kdev), meta_to(meta, kdev), K, 0.25, max_len=320,
                          num_splits=splits)
    assert_same_sets(got.cpu(), want)


def test_split_topk_random_scores_and_decode_placeholders(gen, kdev):
    """Distinct random scores, a decode batch under a graph's placeholder host lengths, split 3 ways."""
    from moelink.kernels.triton_dsa_topk import triton_dsa_topk

    ctx_q = [(200, 1), (33, 1), (9, 1), (130, 1)]
    meta = meta_of(gen, ctx_q, kdev)
    H, D, K = 16, 16, 10
    cache = cache_of(gen, meta, D, torch.float32, kdev)
    q = torch.randn(4, H, D, generator=gen).to(kdev)
    w = torch.randn(4, H, generator=gen).to(kdev)
    want = reference_dsa_topk(q.cpu(), w.cpu(), cache.cpu(), meta_to(meta, "cpu"), K, 0.25)
    graph_meta = AttentionMetadata(meta.query_start_loc_S1, meta.seq_lens_S, meta.block_tables_SM, meta.slot_mapping_T,
                                   [1] * 4, [1] * 4, 1, 1, meta.null_block)
    got = triton_dsa_topk(q, w, cache, graph_meta, K, 0.25, max_len=208, num_splits=3)
    assert_same_sets(got.cpu(), want)


def test_split_programs_follow_the_context_and_the_batch():
    """One program per row below SPLIT_MIN_WIDTH or when the batch fills the SMs; about sqrt(width / K) at 128k."""
    from moelink.kernels.triton_dsa_select import SPLIT_MIN_WIDTH, split_programs

    assert split_programs(SPLIT_MIN_WIDTH - 1, 2048, 1, 132) == 1
    assert split_programs(8192, 2048, 1, 132) == 1
    assert split_programs(131072, 2048, 1, 132) == 8
    assert split_programs(32768, 2048, 1, 132) == 4
    assert split_programs(163840, 2048, 64, 132) == 4  # 2 x 132 SMs / 64 rows
    assert split_programs(163840, 2048, 256, 132) == 1


@pytest.mark.parametrize("dtype,D", [(torch.float32, 12), (torch.bfloat16, 16), (torch.float32, 160)],
                         ids=["fp32-D12-pad", "bf16-D16", "fp32-D160-2groups"])
def test_triton_fp8_key_write_equals_reference_bytes(gen, kdev, dtype, D):
    """The Triton write's rows equal the reference's byte for byte (key, pad, scales), padding tokens into the null
    block, other rows untouched; keys at scales from 1e-3 to 300 and an all-zero one."""
    from moelink.kernels.triton_dsa_keys import triton_write_fp8_index_keys

    T = 7
    k = (torch.randn(T, D, generator=gen) * torch.tensor([1e-3, 1.0, 30.0, 300.0, 0.0, 2.0, 5.0])[:, None]).to(dtype)
    slots = torch.tensor([5, 0, -1, 11, 2, -1, 8])
    X = fp8_key_row_bytes(D)
    want = torch.full((4, 3, X), 7, dtype=torch.uint8)
    reference_write_fp8_index_keys(k, want, slots)
    got = torch.full((4, 3, X), 7, dtype=torch.uint8, device=kdev)
    triton_write_fp8_index_keys(k.to(kdev), got, slots.to(kdev))
    assert torch.equal(got.cpu(), want)
    assert (want.view(-1, X)[[1, 3, 4, 6, 7, 10]] == 7).all()  # rows no token wrote


def test_split_path_picked_by_the_width_equals_reference(gen, kdev, monkeypatch):
    """No num_splits: a decode batch scored max_len = SPLIT_MIN_WIDTH wide takes the split path by itself (its
    partial kernel launched), rows above and below P * K, and selects the reference's positions."""
    from moelink.kernels import triton_dsa_topk as topk_mod
    from moelink.kernels.triton_dsa_select import SPLIT_MIN_WIDTH

    ctx_q = [(90, 1), (13, 1), (5, 1)]  # P = 2 (CPU: 4 "SMs", 3 rows): above P * K = 16, between K and it, below K
    meta = meta_of(gen, ctx_q, kdev)
    H, D, K = 16, 16, 8
    cache = cache_of(gen, meta, D, torch.float32, kdev)
    q = torch.randn(3, H, D, generator=gen).to(kdev)
    w = torch.randn(3, H, generator=gen).to(kdev)
    want = reference_dsa_topk(q.cpu(), w.cpu(), cache.cpu(), meta_to(meta, "cpu"), K, 0.25)
    launched = []
    real = topk_mod._partial_topk_kernel
    monkeypatch.setattr(topk_mod, "_partial_topk_kernel", type("K", (), {"__getitem__": lambda self, grid: (
        launched.append(grid), real[grid])[1]})())
    got = topk_mod.triton_dsa_topk(q, w, cache, meta, K, 0.25, max_len=SPLIT_MIN_WIDTH)
    assert launched and launched[0][1] > 1, launched
    assert_same_sets(got.cpu(), want)
