"""The compressed-attention and hyper-connection Triton kernels, DeepSeek-V4's (kernels/triton_compressed_attention.py,
triton_compressed_topk.py, triton_hyper_connection.py), against their plain-torch references
(kernels/compressed_attention.py, hyper_connection.py) run in float64 on the same inputs; Triton in the interpreter on
CPU.

Shapes are small and ragged, built as the attention layer builds them (engine/models/deepseek_v4/attention.py): a decode
token, a chunk over a cached prefix, a fresh prompt; contexts and windows not multiples of the compress rate or the
kernels' tiles; key rows no query may read (never-written cache rows) NaN-poisoned in the kernel's input only.
"""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.compressed_attention import (reference_compress, reference_grouped_linear, reference_indexer_topk,
                                                  reference_sink_attention)
from moelink.kernels.hyper_connection import reference_hc_expand
from moelink.kernels.triton_compressed_attention import triton_compress_kv, triton_grouped_linear, triton_sink_attention
from moelink.kernels.triton_compressed_topk import triton_compressed_indexer_topk
from moelink.kernels.triton_hyper_connection import triton_hc_expand

from tests.helpers.dsa_cases import assert_same_sets

# (p0, p1): a sequence's queries at positions p0..p1-1, over a cached prefix of p0 tokens.
STEPS = [(0, 7), (9, 10), (13, 19), (36, 37)]


def _layer_inputs(gen, p0: int, p1: int, W: int, m: int, H: int, topk: int | None):
    """What DSV4Attention._sequence hands the attention: keys = window rows lo..p1-1 then the p1 // m entries, the
    allowed mask (window causal, entries visible by (p + 1) // m, CSA: only `topk` random picks of them)."""
    lo = max(0, p0 - W + 1)
    E = p1 // m
    keys = torch.randn(p1 - lo + E, H, generator=gen, dtype=torch.float64)
    q_pos, k_pos = torch.arange(p0, p1), torch.arange(lo, p1)
    allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - W)
    visible = (q_pos + 1) // m
    seen = torch.arange(E)[None, :] < visible[:, None]
    if topk is not None:
        picks = torch.rand(len(q_pos), E, generator=gen).masked_fill(~seen, -1).argsort(dim=1, descending=True)
        keep = torch.zeros_like(seen)
        keep.scatter_(1, picks[:, :topk], True)
        seen = seen & keep
    return keys, torch.cat([allowed, seen], dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overlap,m,n", [(False, 8, 3), (False, 3, 1), (True, 2, 5), (True, 4, 2)])
def test_compress_equals_reference(gen, kdev, check, dtype, overlap, m, n):
    """HCA (one series) and CSA (the previous window's Ca half, -inf gates before window 0), H = 20: two tiles."""
    H = 20
    C = 2 * H if overlap else H
    kv = torch.randn(n, m, C, generator=gen, dtype=torch.float64)
    gate = torch.randn(n, m, C, generator=gen, dtype=torch.float64) * 3
    prev_kv = prev_gate = None
    if overlap:
        prev_kv = torch.randn(n, m, H, generator=gen, dtype=torch.float64)
        prev_gate = torch.randn(n, m, H, generator=gen, dtype=torch.float64)
        prev_kv[0], prev_gate[0] = 0.0, float("-inf")  # window 0 has no previous window
    kv_d = kv.to(dtype)
    want = reference_compress(kv_d.double(), gate.float().double(), None if prev_kv is None else prev_kv.to(
        dtype).double(), None if prev_gate is None else prev_gate.float().double())
    got = triton_compress_kv(kv_d.to(kdev), gate.float().to(kdev), None if prev_kv is None else prev_kv.to(dtype).to(
        kdev), None if prev_gate is None else prev_gate.float().to(kdev))
    assert got.dtype == dtype
    check(got, want, dtype, f"compress overlap={overlap} m={m}")


def test_compress_refuses_mismatched_halves(kdev):
    kv = torch.zeros(2, 4, 16, device=kdev)
    with pytest.raises(ValueError, match=r"kv_nmC \(2, 4, 16\).*\[n, m, 2H\]"):
        triton_compress_kv(kv, kv, torch.zeros(2, 4, 16, device=kdev), torch.zeros(2, 4, 16, device=kdev))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p0,p1", STEPS)
@pytest.mark.parametrize("csa", [False, True])
def test_sink_attention_equals_reference(gen, kdev, check, dtype, p0, p1, csa):
    """N = 5 heads (one partial tile), H = 24; keys no query reads are NaN in the kernel's input."""
    N, H, W, m = 5, 24, 6, (2 if csa else 8)
    keys, allowed = _layer_inputs(gen, p0, p1, W, m, H, 3 if csa else None)
    q = torch.randn(p1 - p0, N, H, generator=gen, dtype=torch.float64)
    sinks = torch.randn(N, generator=gen)
    q_d, k_d = q.to(dtype), keys.to(dtype)
    want = reference_sink_attention(q_d.double(), k_d.double(), allowed, sinks, H**-0.5)
    k_d = k_d.masked_fill(~allowed.any(dim=0)[:, None], float("nan"))
    got = triton_sink_attention(q_d.to(kdev), k_d.to(kdev), allowed.to(kdev), sinks.to(kdev), H**-0.5)
    check(got, want, dtype, f"sink attention [{p0}, {p1}) csa={csa}")


def test_sink_attention_all_sink_when_nothing_is_seen(kdev):
    """A query that sees nothing (not a case the layer makes, but the kernel's floor): the sink takes the whole
    softmax, the output is 0 (the reference's softmax over [-inf..., sink] gives the same)."""
    q, k = torch.ones(1, 2, 16, device=kdev), torch.full((3, 16), float("nan"), device=kdev)
    got = triton_sink_attention(q, k, torch.zeros(1, 3, dtype=torch.bool, device=kdev),
                                torch.zeros(2, device=kdev), 0.25)
    assert torch.equal(got.cpu(), torch.zeros(1, 2, 16))


@pytest.mark.parametrize("E,topk,splits", [(0, 4, None), (7, 4, None), (37, 4, None), (37, 4, 2), (150, 8, 3),
                                          (150, 8, 1)])
def test_indexer_topk_equals_reference(gen, kdev, E, topk, splits):
    """Ragged visible counts (0, fewer than top-k, all of E, in between), entries past the largest count NaN; the
    split path (P programs per row and a merge) at P = 2 and 3 beside one program per row."""
    nI, I = 3, 24
    vis = torch.tensor(sorted({0, min(E, 2), min(E, topk), E // 2, E, max(0, E - 1)}), dtype=torch.long)
    T = len(vis)
    q = torch.randn(T, nI, I, generator=gen)
    w = torch.randn(T, nI, generator=gen)
    keys = torch.randn(E, I, generator=gen)
    want = reference_indexer_topk(q, w, keys, vis, topk)
    keys[int(vis.max()):] = float("nan")
    got = triton_compressed_indexer_topk(q.to(kdev), w.to(kdev), keys.to(kdev), vis.to(kdev), topk, num_splits=splits)
    assert_same_sets(got.cpu(), want)


def test_indexer_topk_ties_keep_the_lowest_entries(kdev):
    """Equal scores (repeated keys) on the boundary of the top-k: the lowest entries win, as the reference's."""
    keys = torch.tensor([[1.0] * 16, [2.0] * 16] * 6)  # scores alternate: ties among the even and the odd entries
    q, w = torch.ones(2, 1, 16), torch.ones(2, 1)
    vis = torch.tensor([12, 9])
    want = reference_indexer_topk(q, w, keys, vis, 4)
    for splits in (1, 2):
        got = triton_compressed_indexer_topk(q.to(kdev), w.to(kdev), keys.to(kdev), vis.to(kdev), 4, num_splits=splits)
        assert_same_sets(got.cpu(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 5, 37])
def test_grouped_linear_equals_reference(gen, kdev, check, dtype, T):
    G, d, o = 3, 40, 20  # d and o not multiples of the tiles
    x = torch.randn(T, G, d, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(G, o, d, generator=gen, dtype=torch.float64).to(dtype)
    want = reference_grouped_linear(x.double(), w.double())
    got = triton_grouped_linear(x.to(kdev), w.to(kdev))
    check(got, want, dtype, f"grouped linear T={T}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_query_keys_equal_reference(gen, kdev, check, dtype):
    """A batched decode step's layout: each query its own keys ([T, S, H] for the attention, [T, E, I] for the
    indexer), rows it may not see NaN in the kernels' input."""
    T, N, H, S, nI, I, E, K = 5, 5, 24, 19, 3, 16, 23, 4
    q = torch.randn(T, N, H, generator=gen, dtype=torch.float64).to(dtype)
    keys = torch.randn(T, S, H, generator=gen, dtype=torch.float64).to(dtype)
    allowed = torch.rand(T, S, generator=gen) < 0.6
    allowed[:, 0] = True
    sinks = torch.randn(N, generator=gen)
    want = reference_sink_attention(q.double(), keys.double(), allowed, sinks, H**-0.5)
    got = triton_sink_attention(q.to(kdev), keys.masked_fill(~allowed[..., None], float("nan")).to(kdev),
                                allowed.to(kdev), sinks.to(kdev), H**-0.5)
    check(got, want, dtype, "sink attention, per-query keys")
    iq, iw = torch.randn(T, nI, I, generator=gen), torch.randn(T, nI, generator=gen)
    ikeys = torch.randn(T, E, I, generator=gen)
    vis = torch.tensor([0, 3, 9, 17, 23])
    want_k = reference_indexer_topk(iq, iw, ikeys, vis, K)
    ikeys[torch.arange(E)[None, :] >= vis[:, None]] = float("nan")
    got_k = triton_compressed_indexer_topk(iq.to(kdev), iw.to(kdev), ikeys.to(kdev), vis.to(kdev), K)
    assert_same_sets(got_k.cpu(), want_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,n,D", [(1, 4, 40), (7, 3, 1100)])  # hc_mult 4 (V4) and 3 (the tiny model); D past a tile
def test_hc_expand_equals_reference(gen, kdev, check, dtype, T, n, D):
    """The hyper-connections' residual: post[k] * out + sum_j comb[j, k] x[j], mixes in float32 (Sinkhorn-like
    positive comb, so no cancellation hides an error)."""
    x = torch.randn(T, n, D, generator=gen, dtype=torch.float64).to(dtype)
    out = torch.randn(T, D, generator=gen, dtype=torch.float64).to(dtype)
    post = torch.rand(T, n, generator=gen) * 2
    comb = torch.rand(T, n, n, generator=gen)
    comb = comb / comb.sum(dim=-2, keepdim=True)
    want = reference_hc_expand(x.double(), out.double(), post.double(), comb.double())
    got = triton_hc_expand(x.to(kdev), out.to(kdev), post.to(kdev), comb.to(kdev))
    assert got.dtype == dtype
    check(got, want, dtype, f"hc expand T={T} n={n}")
