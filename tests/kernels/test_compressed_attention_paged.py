"""DeepSeek-V4's paged decode ops (kernels/triton_compressed_attention_paged.py: the indexer's top-k over index keys and the sink
attention over window ring rows and entries, all read where the cache keeps them) against their plain-torch
references (kernels/compressed_attention.py: reference_paged_*), and those references against the per-query-key ops on keys this
test gathers by hand. Triton in the interpreter on CPU.

A batch as a decode step makes it (engine/models/deepseek_v4/decode.py): rows of different lengths on shuffled blocks of
Lc = 3 entries (so E = M Lc = 15 is no multiple of a tile and a row's last block is partly written), a padding row
(slot -1, every table column the null block, nothing visible), picks with -1s; every cache row no query may read
(ring rows of positions < 0, entries at or past a row's visible count, blocks no table names) is NaN.
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.compressed_attention import (reference_indexer_topk, reference_paged_indexer_topk,
                                                  reference_paged_sink_attention, reference_sink_attention)
from moelink.kernels.triton_compressed_attention_paged import (triton_paged_compressed_indexer_topk,
                                                               triton_paged_sink_attention)

from tests.helpers.dsa_cases import assert_same_sets

LC, M, W = 3, 5, 6  # entries per block, table width, window
POS = [0, 4, 9, 16, 29, 0]  # each row's query position; the last row is padding
SLOT = [2, 0, 3, 1, 4, -1]


class Batch:
    """Six rows (module docstring): positions POS, compress rate m; block table rows over shuffled blocks, the null
    block (the last) for columns past a row's blocks and for the padding row."""

    def __init__(self, gen, m: int):
        T = len(POS)
        self.pos = torch.tensor(POS)
        self.slot = torch.tensor(SLOT)
        self.visible = torch.where(self.slot >= 0, (self.pos + 1) // m, 0)
        B = T * M + 1  # the null block last
        order = torch.randperm(B - 1, generator=gen)
        self.table = torch.full((T, M), B - 1, dtype=torch.int32)
        for t in range(T - 1):
            used = -(-int(self.visible[t]) // LC)
            self.table[t, :used] = order[t * M: t * M + used].int()
        self.B = B

    def pages(self, gen, X: int) -> torch.Tensor:
        """[B, Lc, X] float64: each row's visible entries random, every other cache row NaN."""
        pages = torch.full((self.B, LC, X), float("nan"), dtype=torch.float64)
        for t in range(len(POS)):
            for e in range(int(self.visible[t])):
                pages[self.table[t, e // LC], e % LC] = torch.randn(X, generator=gen, dtype=torch.float64)
        return pages

    def window(self, gen, H: int) -> torch.Tensor:
        """[P, W, H] float64 ring rows: the rows of positions >= 0 random, the rest (and the null slot) NaN."""
        ring = torch.full((max(SLOT) + 2, W, H), float("nan"), dtype=torch.float64)
        for p, s in zip(POS, SLOT):
            for r in range(W):
                if s >= 0 and p - (p - r) % W >= 0:
                    ring[s, r] = torch.randn(H, generator=gen, dtype=torch.float64)
        return ring

    def gathered(self, pages: torch.Tensor, t: int, ids) -> torch.Tensor:
        """Row t's entries `ids`, gathered by hand: [len(ids), X]."""
        return torch.stack([pages[self.table[t, e // LC], e % LC] for e in ids]) if len(ids) else pages[0, :0]


def _picks(gen, visible: torch.Tensor, K: int) -> torch.Tensor:
    """Random distinct visible ids per row, in random order, -1 padded (and one -1 in the middle of a full row)."""
    picks = torch.full((len(visible), K), -1, dtype=torch.int32)
    for t, v in enumerate(visible.tolist()):
        ids = torch.randperm(v, generator=gen)[:K]
        picks[t, :len(ids)] = ids.int()
        if len(ids) == K and K > 1:
            picks[t, 1] = -1
    return picks


@pytest.mark.parametrize("m,topk,splits", [(2, 4, None), (2, 4, 2), (3, 2, 1), (2, 20, None)])
def test_paged_indexer_topk_equals_reference(gen, kdev, m, topk, splits):
    """Ragged visible counts (0 to all 15 a table addresses); the top-k's split path at P = 2 beside one program;
    a top-k larger than any row's count (all visible, then -1)."""
    b = Batch(gen, m)
    nI, I = 3, 20
    q = torch.randn(len(POS), nI, I, generator=gen, dtype=torch.float64)
    w = torch.randn(len(POS), nI, generator=gen, dtype=torch.float64)
    keys = b.pages(gen, I)
    want = reference_paged_indexer_topk(q, w, keys, b.table, b.visible, topk)
    for t in range(len(POS)):  # the reference against the per-query op on keys gathered by hand
        v = int(b.visible[t])
        ref_t = reference_indexer_topk(q[t:t + 1], w[t:t + 1], b.gathered(keys, t, range(v)), b.visible[t:t + 1], topk)
        assert torch.equal(want[t:t + 1], ref_t)
    got = triton_paged_compressed_indexer_topk(q.float().to(kdev), w.float().to(kdev), keys.float().to(kdev),
                                               b.table.to(kdev), b.visible.to(kdev), topk, num_splits=splits)
    assert got.dtype == torch.int32 and got.shape == (len(POS), topk)
    assert_same_sets(got.cpu(), want)
    assert (got[-1] == -1).all()  # the padding row picks nothing


def _hand_attention(b: Batch, q, ring, pages, picks, sinks, scale):
    """Each row's keys built by hand ([seen window rows | its entries]), one reference_sink_attention per row."""
    outs = []
    for t in range(len(POS)):
        p, s = POS[t], SLOT[t]
        rows = [ring[s, r] for r in range(W) if s >= 0 and p - (p - r) % W >= 0]
        if picks is None and pages is not None:
            ids = list(range(int(b.visible[t])))
        else:
            ids = [] if pages is None else [e for e in picks[t].tolist() if e >= 0]
        none = ring[0, :0]
        keys = torch.cat([torch.stack(rows) if rows else none, b.gathered(pages, t, ids) if ids else none])
        allowed = torch.ones(1, keys.shape[0], dtype=torch.bool)
        outs.append(reference_sink_attention(q[t:t + 1], keys, allowed, sinks, scale))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["csa", "hca", "sliding"])
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_paged_sink_attention_equals_reference(gen, kdev, check, dtype, kind, splits):
    """N = 20 heads (a partial second tile), H = 24; CSA's picks (-1s among them), HCA's every visible entry, a
    sliding layer's window only; one split, three, and the host's choice."""
    N, H, K, m = 20, 24, 4, (2 if kind == "csa" else 3)
    b = Batch(gen, m)
    q = torch.randn(len(POS), N, H, generator=gen, dtype=torch.float64).to(dtype)
    sinks = torch.randn(N, generator=gen)
    ring, pages = b.window(gen, H).to(dtype), b.pages(gen, H).to(dtype)
    picks = _picks(gen, b.visible, K) if kind == "csa" else None
    if kind == "sliding":
        pages = None
    args = (b.slot, b.pos, pages, b.table if pages is not None else None, picks,
            b.visible if pages is not None else None)
    want = reference_paged_sink_attention(q.double(), ring.double(), *args[:2],
                                          None if pages is None else pages.double(), *args[3:], sinks, H**-0.5)
    hand = _hand_attention(b, q.double(), ring.double(), None if pages is None else pages.double(), picks, sinks,
                           H**-0.5)
    torch.testing.assert_close(want, hand, rtol=1e-12, atol=1e-12)
    assert not torch.isnan(want).any()
    dev_args = tuple(None if a is None else a.to(kdev) for a in args)
    got = triton_paged_sink_attention(q.to(kdev), ring.to(kdev), *dev_args, sinks.to(kdev), H**-0.5,
                                      num_splits=splits)
    assert got.dtype == dtype
    check(got[:-1], want[:-1], dtype, f"paged sink attention {kind} splits={splits}")
    assert torch.equal(got[-1].cpu().float(), torch.zeros(N, H))  # the padding row: the sink alone, output 0
    if kind == "csa":  # a row's columns past its visible count are not read: an id there (a NaN entry) changes nothing
        tail = picks.clone()
        for t, v in enumerate(b.visible.tolist()):
            tail[t, v:] = v
        again = triton_paged_sink_attention(q.to(kdev), ring.to(kdev), b.slot.to(kdev), b.pos.to(kdev),
                                            pages.to(kdev), b.table.to(kdev), tail.to(kdev), b.visible.to(kdev),
                                            sinks.to(kdev), H**-0.5, num_splits=splits)
        assert torch.equal(again.cpu(), got.cpu())


def test_paged_ops_refuse_mismatched_shapes(kdev):
    q = torch.zeros(2, 3, 16, device=kdev)
    with pytest.raises(ValueError, match=r"table_TM \(3, 4\).*\[2, M\]"):
        triton_paged_compressed_indexer_topk(q, torch.zeros(2, 3, device=kdev), torch.zeros(5, 2, 16, device=kdev),
                                             torch.zeros(3, 4, dtype=torch.int32, device=kdev),
                                             torch.zeros(2, dtype=torch.long, device=kdev), 4)
    with pytest.raises(ValueError, match=r"entries_BLcH \(5, 2, 8\).*\[B, Lc, 16\]"):
        i = torch.zeros(2, dtype=torch.long, device=kdev)
        triton_paged_sink_attention(q, torch.zeros(3, 4, 16, device=kdev), i, i, torch.zeros(5, 2, 8, device=kdev),
                                    torch.zeros(2, 4, dtype=torch.int32, device=kdev), None, i,
                                    torch.zeros(3, device=kdev), 0.25)
