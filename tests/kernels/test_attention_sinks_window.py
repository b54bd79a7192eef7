"""gpt-oss's attention extras: per-head sinks and a sliding window, in the reference paged attention (against
a per-query float64 oracle written out here) and in the Triton kernels (against the reference; interpreter on
CPU), at ragged shapes: decode, chunks over cached prefixes whose window starts mid-context, split-K both ways.

Without sinks and window both must be exactly today's kernels: the default path is unchanged (checked by the
existing test_triton_attention.py / test_reference.py, which pass neither argument).
"""
from __future__ import annotations

import math

import pytest
import torch

from moelink.kernels.attention import reference_paged_attention
from moelink.kernels.triton_attention import triton_paged_attention, triton_write_kv

from tests.kernels.test_triton_attention import _build, _meta_to


def _oracle(q_TNH, k_cache, v_cache, meta, scale, sinks_N, window):
    """Each query of each head alone: scores over the keys its position sees, the sink's logit in the
    softmax denominator, in float64."""
    L, K = k_cache.shape[1], k_cache.shape[2]
    N = q_TNH.shape[1]
    out = torch.zeros(q_TNH.shape, dtype=torch.float64)
    t = 0
    for s, (qlen, ctx) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        table = meta.block_tables_SM[s].tolist()
        slots = [table[p // L] * L + p % L for p in range(ctx)]
        k_CKH = k_cache.double().reshape(-1, K, k_cache.shape[3])[slots]
        v_CKH = v_cache.double().reshape(-1, K, v_cache.shape[3])[slots]
        for i in range(qlen):
            p = ctx - qlen + i
            lo = 0 if window is None else max(0, p - window + 1)
            for n in range(N):
                kh = n // (N // K)
                logits = (k_CKH[lo : p + 1, kh] @ q_TNH[t, n].double()) * scale
                if sinks_N is not None:
                    z = torch.cat([logits, sinks_N[n].double().view(1)])
                    w = torch.softmax(z, 0)[:-1]
                else:
                    w = torch.softmax(logits, 0)
                out[t, n] = w @ v_CKH[lo : p + 1, kh]
            t += 1
    return out


# (ctx_q [(context after this step, query length)], N, K, H, block size, window)
CASES = [
    ([(1, 1), (5, 1), (17, 1), (40, 1)], 4, 2, 16, 4, 6),  # decode: windows cut mid-block, one shorter than W
    ([(20, 20)], 4, 1, 16, 4, 5),  # one prompt, no prefix, longer than the window (MQA)
    ([(45, 13), (9, 9), (30, 1), (64, 64)], 6, 2, 24, 16, 7),  # chunks whose window starts mid-prefix + decode
    ([(23, 2), (1, 1), (50, 17)], 4, 2, 16, 8, 3),  # a 2-token chunk, first-token decode, mixed
    ([(37, 11)], 4, 2, 8, 4, 64),  # window wider than the context: plain causal + sinks
]


@pytest.mark.parametrize("sinks", [True, False], ids=["sinks", "nosinks"])
@pytest.mark.parametrize("ctx_q,N,K,H,bs,window", CASES)
def test_reference_matches_oracle(ctx_q, N, K, H, bs, window, sinks, gen):
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, ctx_q, N, K, H, bs, torch.float64, "cpu")
    from moelink.kernels.attention import reference_write_kv

    reference_write_kv(k_new, v_new, kc, vc, slots)
    sinks_N = torch.randn(N, generator=gen, dtype=torch.float64) * 2 if sinks else None
    for w in (window, None):
        if w is None and not sinks:
            continue
        got = reference_paged_attention(q, kc, vc, meta, 0.3, sinks_N=sinks_N, sliding_window=w)
        want = _oracle(q, kc, vc, meta, 0.3, sinks_N, w)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{ctx_q} window={w} sinks={sinks}")


def test_sinks_and_window_change_the_answer(gen):
    """The extras are not silently ignored: each one moves the output of a long-context query."""
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, [(30, 3)], 4, 2, 16, 4, torch.float64, "cpu")
    from moelink.kernels.attention import reference_write_kv

    reference_write_kv(k_new, v_new, kc, vc, slots)
    plain = reference_paged_attention(q, kc, vc, meta, 0.3)
    sinks = torch.full((4,), 3.0, dtype=torch.float64)
    assert not torch.allclose(plain, reference_paged_attention(q, kc, vc, meta, 0.3, sinks_N=sinks))
    assert not torch.allclose(plain, reference_paged_attention(q, kc, vc, meta, 0.3, sliding_window=4))


def test_bad_extras_are_refused():
    q = torch.zeros(2, 4, 8)
    kc = torch.zeros(3, 4, 2, 8)
    from moelink.kernels.attention import AttentionMetadata

    meta = AttentionMetadata(torch.tensor([0, 2]), torch.tensor([2]), torch.zeros(1, 1, dtype=torch.int32),
                             torch.tensor([0, 1]), [2], [2], 2, 2, null_block=2)
    with pytest.raises(ValueError, match=r"sinks_N \(3,\) is invalid: must be one logit per query head, \[4\]"):
        reference_paged_attention(q, kc, kc, meta, 1.0, sinks_N=torch.zeros(3))
    with pytest.raises(ValueError, match="sliding_window=0 is invalid"):
        reference_paged_attention(q, kc, kc, meta, 1.0, sliding_window=0)


TRITON_CASES = [
    # (ctx_q, N, K, H, bs, sinks, window, decode splits, prefill splits, dtype)
    ([(1, 1), (5, 1), (17, 1), (40, 1)], 4, 2, 16, 4, True, 6, None, None, torch.float32),
    ([(5, 1), (33, 1)], 4, 2, 16, 4, True, None, 3, None, torch.bfloat16),  # sinks alone, split decode
    ([(150, 1), (3, 1)], 8, 2, 16, 16, True, 37, 4, None, torch.bfloat16),  # splits before the window are empty
    ([(45, 13), (9, 9), (30, 1), (40, 24)], 6, 2, 24, 16, True, 7, 2, None, torch.float32),  # window mid-prefix
    ([(23, 2), (1, 1), (50, 17)], 4, 2, 16, 8, False, 3, None, None, torch.bfloat16),  # window alone
    ([(97, 5), (40, 1), (3, 2)], 8, 2, 16, 4, True, 9, None, 3, torch.float32),  # split prefill + a decode
    ([(20, 20), (66, 1)], 4, 1, 16, 16, True, 5, None, 5, torch.float32),  # no prefix, split: rows see 1-2 splits
]


@pytest.mark.parametrize("ctx_q,N,K,H,bs,sinks,window,zd,zp,dtype", TRITON_CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_triton_matches_reference(ctx_q, N, K, H, bs, sinks, window, zd, zp, dtype, gen, kdev, check, nan_buffer):
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, ctx_q, N, K, H, bs, dtype, kdev)
    triton_write_kv(k_new, v_new, kc, vc, slots)
    sinks_N = (torch.randn(N, generator=gen) * 2).to(dtype).to(kdev) if sinks else None
    scale = 1 / math.sqrt(H)
    out = nan_buffer(q.shape, dtype, kdev)
    got = triton_paged_attention(q, kc, vc, meta, scale, sinks_N=sinks_N, sliding_window=window, out=out,
                                 num_splits=zd, prefill_splits=zp)
    want = reference_paged_attention(q.double().cpu(), kc.double().cpu(), vc.double().cpu(), _meta_to(meta, "cpu"),
                                      scale, sinks_N=None if sinks_N is None else sinks_N.double().cpu(),
                                      sliding_window=window)
    check(got, want, dtype, f"{ctx_q} window={window} sinks={sinks} Z={zd} Zp={zp}")


def test_sliding_layer_does_not_split_past_its_window(gen, kdev, check, monkeypatch):
    """Auto split counts look at the keys a query walks: a long-context decode batch and a short chunk over a
    long prefix split on a full layer, not on a sliding layer whose window is two key tiles."""
    from moelink.kernels import triton_attention as ta

    grids = {}
    for name in ("_decode_kernel", "_prefill_kernel"):
        real = getattr(ta, name)
        monkeypatch.setattr(ta, name, type("Spy", (), {"__getitem__": lambda self, grid, n=name, r=real: (
            grids.setdefault(n, []).append(grid), r[grid])[1]})())
    q, kc, vc, meta, k_new, v_new, slots = _build(gen, [(300, 4), (290, 1)], 4, 2, 16, 16, torch.float32, kdev)
    triton_write_kv(k_new, v_new, kc, vc, slots)
    ref = (q.double().cpu(), kc.double().cpu(), vc.double().cpu(), _meta_to(meta, "cpu"), 0.25)
    for window, split in ((None, True), (24, False)):
        grids.clear()
        got = triton_paged_attention(q, kc, vc, meta, 0.25, sliding_window=window)
        # Split: a prefill grid (q blocks, K, Zp > 1), or a decode grid (P, K) of more programs than sequences.
        split_launches = [g for g in grids["_prefill_kernel"] if g[2] > 1]
        split_launches += [g for g in grids.get("_decode_kernel", []) if g[0] > meta.num_seqs]
        assert bool(split_launches) == split, (window, grids)
        check(got, reference_paged_attention(*ref, sliding_window=window), torch.float32, f"window={window}")
