"""DeepSeek-V4's fp8 KV cache in the kernels (issue 45): the row layout (kernels/compressed_attention.FP8Rows: e4m3 values with a
float32 scale per group, bfloat16 rope values) against a decode worked out by hand, and the paged decode ops reading
fp8 pages (kernels/triton_compressed_attention_paged.py, in the interpreter on CPU) against their references, which read the same
pages decoded in plain torch; those references in turn equal the float references over the decoded values.

The batch is test_compressed_attention_paged's (ragged visible counts, partly written last blocks, a padding row, -1 picks); every
cache row no query may read holds 0xFF bytes: NaN as e4m3, as a float32 scale and as a bfloat16 rope value, so a
kernel that reads one fails.
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.compressed_attention import (FP8Rows, entry_rows, index_key_rows, reference_paged_indexer_topk,
                                                  reference_paged_sink_attention)
from moelink.kernels.triton_compressed_attention_paged import (triton_paged_compressed_indexer_topk,
                                                               triton_paged_sink_attention)

from tests.helpers.dsa_cases import assert_same_sets
from tests.kernels.test_compressed_attention_paged import POS, Batch, _picks


def _fp8_pages(b: Batch, gen, rows: FP8Rows, window: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 pages [B, Lc, X] holding each row's visible entries encoded (window: the ring [P, W, X] of its seen
    rows), every other row 0xFF; the same values decoded, float64 with NaN rows where nothing was written)."""
    vals = (b.window(gen, rows.dim) if window else b.pages(gen, rows.dim)) * 3
    unwritten = torch.isnan(vals[..., 0])
    pages = rows.encode(torch.nan_to_num(vals))
    pages[unwritten] = 0xFF
    decoded = rows.decode(pages, torch.float64)
    decoded[unwritten] = float("nan")
    return pages, decoded


def test_row_layout_and_decode_by_hand():
    """V4-Flash's rows: an entry 448 e4m3 + 7 scales + 64 bf16 = 604 bytes, an index key 128 + 1 scale = 132 (DSA's).
    A small row decoded by hand: values v / s rounded to e4m3 (s = group amax / 448), times s; rope in bf16."""
    assert entry_rows(512, 64).row_bytes == 604 and index_key_rows(128).row_bytes == 132
    r = FP8Rows(10, 2, 4)  # 8 e4m3 values in 2 groups, 2 rope values: 8 + 8 + 4 = 20 bytes
    assert (r.scale_offset, r.rope_offset, r.row_bytes) == (8, 16, 20)
    x = torch.tensor([[448.0, -224.0, 1.0, 3.3, 0.0, 0.0, 0.0, 0.0, 1.0 / 3, -2.0]], dtype=torch.float64)
    row = r.encode(x)
    assert row.shape == (1, 20) and row.dtype == torch.uint8
    scales = row[0, 8:16].view(torch.float32)
    assert scales.tolist() == [1.0, 0.0]  # amax 448 -> scale 1; an all-zero group -> scale 0
    want = torch.tensor([448.0, -224.0, 1.0, 3.25, 0, 0, 0, 0, float(torch.tensor(1.0 / 3).bfloat16()), -2.0])
    assert torch.equal(r.decode(row, torch.float64)[0], want.double())  # 3.3 -> 3.25 (e4m3: 3 mantissa bits)
    y = torch.randn(7, 3, 96, dtype=torch.float64) * 5
    e = entry_rows(96, 16)  # 80 e4m3 values: one group of 64, one of 16
    back = e.round_trip(y)
    assert back.shape == y.shape and torch.equal(back[..., 80:], y[..., 80:].bfloat16().double())
    # e4m3 keeps 3 mantissa bits: |x - q(x)| <= 2^-4 |x| for normals; the scale puts each group's amax at 448
    assert ((back[..., :80] - y[..., :80]).abs() <= y[..., :80].abs() / 16 + 1e-3).all()


@pytest.mark.parametrize("m,topk,splits", [(2, 4, None), (2, 4, 2), (3, 20, None)])
def test_paged_indexer_topk_reads_fp8_keys(gen, kdev, m, topk, splits):
    b = Batch(gen, m)
    nI, I = 3, 20
    q = torch.randn(len(POS), nI, I, generator=gen, dtype=torch.float64)
    w = torch.randn(len(POS), nI, generator=gen, dtype=torch.float64)
    pages, decoded = _fp8_pages(b, gen, index_key_rows(I))
    want = reference_paged_indexer_topk(q.float(), w.float(), pages, b.table, b.visible, topk)
    assert torch.equal(want, reference_paged_indexer_topk(q.float(), w.float(), decoded.float(), b.table, b.visible,
                                                          topk))
    got = triton_paged_compressed_indexer_topk(q.float().to(kdev), w.float().to(kdev), pages.to(kdev), b.table.to(kdev),
                                               b.visible.to(kdev), topk, num_splits=splits)
    assert_same_sets(got.cpu(), want)
    assert (got[-1] == -1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind,window_fp8", [("csa", False), ("csa", True), ("hca", False), ("hca", True),
                                             ("sliding", True)])
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_paged_sink_attention_reads_fp8_entries(gen, kdev, check, dtype, kind, window_fp8, splits):
    """H = 96 with 16 rope dims (80 e4m3 values: a full group and a partial one), N = 20 heads; the window ring
    float or fp8 rows of the same layout; a sliding layer's fp8 window alone."""
    N, H, R, K, m = 20, 96, 16, 4, (2 if kind == "csa" else 3)
    b = Batch(gen, m)
    q = torch.randn(len(POS), N, H, generator=gen, dtype=torch.float64).to(dtype)
    sinks = torch.randn(N, generator=gen)
    if window_fp8:
        ring, ring64 = _fp8_pages(b, gen, entry_rows(H, R), window=True)
    else:
        ring = b.window(gen, H).to(dtype)
        ring64 = ring.double()
    pages, decoded = _fp8_pages(b, gen, entry_rows(H, R))
    picks = _picks(gen, b.visible, K) if kind == "csa" else None
    if kind == "sliding":
        pages = decoded = table = visible = None
    else:
        table, visible = b.table, b.visible
    want = reference_paged_sink_attention(q.double(), ring if window_fp8 else ring64, b.slot, b.pos, pages, table,
                                          picks, visible, sinks, H**-0.5, rope_dims=R)
    oracle = reference_paged_sink_attention(q.double(), ring64, b.slot, b.pos, decoded, table, picks, visible, sinks,
                                            H**-0.5)
    assert torch.equal(want, oracle) and not torch.isnan(want).any()
    dev = lambda x: None if x is None else x.to(kdev)  # noqa: E731
    got = triton_paged_sink_attention(q.to(kdev), ring.to(kdev), b.slot.to(kdev), b.pos.to(kdev), dev(pages),
                                      dev(table), dev(picks), dev(visible), sinks.to(kdev), H**-0.5, rope_dims=R,
                                      num_splits=splits)
    assert got.dtype == dtype
    check(got[:-1], want[:-1], dtype, f"fp8 paged sink attention {kind} splits={splits}")
    assert torch.equal(got[-1].cpu().float(), torch.zeros(N, H))


def test_fp8_pages_of_the_wrong_width_are_refused(kdev):
    q = torch.zeros(2, 3, 32, device=kdev)
    i = torch.zeros(2, dtype=torch.long, device=kdev)
    with pytest.raises(ValueError, match=r"entries_BLcH \(5, 2, 32\).*\[B, Lc, 44\]"):
        triton_paged_sink_attention(q, torch.zeros(3, 4, 32, device=kdev), i, i,
                                    torch.zeros(5, 2, 32, dtype=torch.uint8, device=kdev),
                                    torch.zeros(2, 4, dtype=torch.int32, device=kdev), None, i,
                                    torch.zeros(3, device=kdev), 0.25, rope_dims=8)
