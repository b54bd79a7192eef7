"""MLA with attention sinks (MLAConfig.sinks, Hunyuan Hy4): a learned logit per head joins every softmax's
denominator, its share dropped (transformers' gpt-oss eager attention). The references (kernels/mla.py,
kernels/dsa.py) against that formula; the Triton dense and sparse MLA kernels against the references at small ragged
shapes, unsplit, split (the merge adds the sink once) and on the pure-decode plan path (Triton in the interpreter on
CPU)."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.dsa import causal_lens, reference_sparse_mla_attention
from moelink.kernels.mla import reference_mla_attention

from tests.helpers.dsa_cases import CTX_Q, L, cache_of, meta_of, meta_to, positions

N, C, P = 5, 32, 16  # 5 heads: one head block with padding rows


def _inputs(gen, ctx_q, dtype, device):
    meta = meta_of(gen, ctx_q, device)
    cache = cache_of(gen, meta, C + P, dtype, device)
    T = sum(meta.query_lens)
    q_lat = torch.randn(T, N, C, generator=gen).to(dtype).to(device)
    q_pe = torch.randn(T, N, P, generator=gen).to(dtype).to(device)
    # float32, as MLAAttention holds them. Between 3 and 7: a score's log-sum-exp over these contexts is about 2-7,
    # so every head's sink takes a visible share (random N(0, 2) sinks, under a fresh seed per test, sometimes
    # took under 1 % of a 37-token decode's mass and the 'sinks matter' check failed)
    sinks = (torch.rand(N, generator=gen) * 4 + 3).to(device)
    return meta, cache, q_lat, q_pe, sinks


def test_reference_sinks_are_the_gpt_oss_softmax(gen):
    """Per token and head: out_with_sink = out_without * sum(e^s) / (sum(e^s) + e^sink), the rows read from the
    paged cache by hand; and the sparse reference over every position equals the dense one with sinks too."""
    meta, cache, q_lat, q_pe, sinks = _inputs(gen, CTX_Q, torch.float64, "cpu")
    plain = reference_mla_attention(q_lat, q_pe, cache, meta, 0.3)
    got = reference_mla_attention(q_lat, q_pe, cache, meta, 0.3, sinks_N=sinks)
    q_TNR = torch.cat([q_lat, q_pe], dim=2)
    for t, (s, p) in enumerate(positions(meta, "cpu")):
        slots = [int(meta.block_tables_SM[s, j // L]) * L + j % L for j in range(p + 1)]
        lse_N = torch.logsumexp(q_TNR[t] @ cache.view(-1, C + P)[slots].T * 0.3, dim=-1)
        share_N = torch.sigmoid(lse_N - sinks.double())
        torch.testing.assert_close(got[t], plain[t] * share_N[:, None])
    K = max(meta.seq_lens)
    n = causal_lens(meta, torch.device("cpu"))
    all_TK = torch.where(torch.arange(K)[None, :] < n[:, None], torch.arange(K)[None, :], -1).to(torch.int32)
    torch.testing.assert_close(reference_sparse_mla_attention(q_lat, q_pe, cache, meta, all_TK, 0.3, sinks_N=sinks),
                               got)


def test_bad_sinks_name_the_argument():
    meta, cache, q_lat, q_pe, _ = _inputs(torch.Generator().manual_seed(0), CTX_Q, torch.float64, "cpu")
    with pytest.raises(ValueError, match=r"sinks_N \(3,\) torch.float32 is invalid"):
        reference_mla_attention(q_lat, q_pe, cache, meta, 0.3, sinks_N=torch.zeros(3))


@pytest.mark.parametrize("ctx_q,splits", [(CTX_Q, None), (CTX_Q, 3), ([(37, 1), (5, 1), (20, 1)], 4),
                                          ([(37, 1), (5, 1), (20, 1)], None)],
                         ids=["mixed", "mixed-split", "decode-plan", "decode"])
def test_triton_dense_mla_with_sinks_equals_reference(gen, kdev, ctx_q, splits):
    from moelink.kernels.triton_mla import triton_mla_attention

    meta, cache, q_lat, q_pe, sinks = _inputs(gen, ctx_q, torch.float32, kdev)
    want = reference_mla_attention(q_lat.double().cpu(), q_pe.double().cpu(), cache.double().cpu(),
                                   meta_to(meta, "cpu"), 0.3, sinks_N=sinks.cpu())
    got = triton_mla_attention(q_lat, q_pe, cache, meta, 0.3, sinks_N=sinks, num_splits=splits)
    err = (got.double().cpu() - want).norm() / want.norm()
    assert err < 1e-5, err
    plain = reference_mla_attention(q_lat.double().cpu(), q_pe.double().cpu(), cache.double().cpu(),
                                    meta_to(meta, "cpu"), 0.3)
    assert (plain - want).norm() / want.norm() > 1e-2  # the sinks matter at these values


@pytest.mark.parametrize("splits", [1, 3])
def test_triton_sparse_mla_with_sinks_equals_reference(gen, kdev, splits):
    from moelink.kernels.triton_mla_sparse import triton_sparse_mla_attention

    meta, cache, q_lat, q_pe, sinks = _inputs(gen, CTX_Q, torch.float32, kdev)
    K = 20 if splits > 1 else 8
    rows = []
    for _, p in positions(meta, "cpu"):
        picked = torch.randperm(p + 1, generator=gen)[:K].tolist()
        rows.append(picked + [-1] * (K - len(picked)))
    topk = torch.tensor(rows, dtype=torch.int32)
    want = reference_sparse_mla_attention(q_lat.double().cpu(), q_pe.double().cpu(), cache.double().cpu(),
                                          meta_to(meta, "cpu"), topk, 0.2, sinks_N=sinks.cpu())
    got = triton_sparse_mla_attention(q_lat, q_pe, cache, meta, topk.to(kdev), 0.2, sinks_N=sinks,
                                      num_splits=splits)
    err = (got.double().cpu() - want).norm() / want.norm()
    assert err < 1e-5, err
