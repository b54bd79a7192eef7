"""A decode batch's router in one launch (kernels/triton_router_gemv.py: the gate GEMV, then route_topk's row in the
token's last program) against its reference (kernels/router_topk.py reference_gate_route_topk), against
route_topk's own kernel on the launch's logits (bit for bit), and its own properties: counters left zero, batch
invariance, the unfused form past FUSED_MAX_TOKENS."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.norm import FUSED_MAX_TOKENS
from moelink.kernels.router_topk import reference_gate_route_topk
from moelink.kernels.triton_router_gemv import triton_gate_route_topk
from moelink.kernels.triton_router_topk import triton_route_topk

# (T, D, G, top_k, method, keywords, gate dtype): Qwen3 (softmax greedy, renormalised, a bf16 gate), DeepSeek-V3
# (noaux_tc: sigmoid, bias, groups; the float32 gate bf16 x is cast to), DeepSeek-V2 (group-limited greedy),
# DeepSeek-V4's sqrt(softplus) with a gate bias, the largest fused batch.
CASES = [(1, 64, 12, 3, "greedy", dict(renormalize=True), torch.bfloat16),
         (3, 48, 16, 2, "noaux_tc", dict(n_group=4, topk_group=2, renormalize=True, scale=2.5), torch.float32),
         (2, 40, 20, 4, "group_limited_greedy", dict(n_group=4, topk_group=2), torch.float32),
         (FUSED_MAX_TOKENS, 72, 24, 6, "sqrtsoftplus", dict(renormalize=True), torch.float32)]


def _inputs(gen, T, D, G, method, gate_dtype, kdev, gate_bias=False):
    x = torch.randn(T, D, generator=gen).to(torch.bfloat16)
    gate = (torch.randn(G, D, generator=gen) / D ** 0.5).to(gate_dtype)
    gb = (0.1 * torch.randn(G, generator=gen)).to(gate_dtype) if gate_bias else None
    bias = torch.randn(G, generator=gen) if method in ("noaux_tc", "sqrtsoftplus") else None
    valid = torch.ones(T, dtype=torch.bool)
    if T > 1:
        valid[-1] = False  # a padding row: routed nowhere, counted nowhere
    return [t.to(kdev) if t is not None else None for t in (x, gate, gb, bias, valid)]


def _sorted(w, i):
    order = torch.argsort(i, dim=-1)
    return torch.gather(w, -1, order), torch.gather(i, -1, order)


@pytest.mark.parametrize("T,D,G,top_k,method,kw,gate_dtype", CASES, ids=[c[4] for c in CASES])
def test_gate_route_topk_matches_the_unfused_ops(T, D, G, top_k, method, kw, gate_dtype, gen, kdev, seed):
    x, gate, gb, bias, valid = _inputs(gen, T, D, G, method, gate_dtype, kdev, gate_bias=method == "sqrtsoftplus")
    counts, counters = torch.zeros(G, dtype=torch.int64, device=kdev), torch.zeros(FUSED_MAX_TOKENS, dtype=torch.int32,
                                                                                    device=kdev)
    w, ids, logits = triton_gate_route_topk(x, gate, gb, top_k, method, **kw, bias_G=bias, valid_T=valid,
                                            counts_G=counts, counters_T=counters)
    assert not counters.any(), f"the launch must leave its counters zero (seed={seed})"
    assert logits.dtype == gate_dtype and (ids[~valid] == -1).all()
    # The tail is route_topk's row: bit for bit the route_topk kernel on the launch's own logits, count included.
    want_counts = torch.zeros_like(counts)
    want_w, want_ids = triton_route_topk(logits, top_k, method, **kw, bias_G=bias, valid_T=valid,
                                         counts_G=want_counts)
    assert torch.equal(w, want_w) and torch.equal(ids, want_ids) and torch.equal(counts, want_counts), f"seed={seed}"
    # The logits within an ulp-level tolerance of torch's matmul; ids and weights as the reference's (as sets: the
    # grouped methods' order is unspecified), on these well-separated random logits.
    ref_counts = torch.zeros(G, dtype=torch.int64)
    ref_w, ref_ids, ref_logits = reference_gate_route_topk(x.cpu(), gate.cpu(), gb.cpu() if gb is not None else None,
                                                           top_k, method, **kw,
                                                           bias_G=bias.cpu() if bias is not None else None,
                                                           valid_T=valid.cpu(), counts_G=ref_counts)
    tol = 1e-2 if gate_dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(logits.cpu().float(), ref_logits.float(), atol=tol, rtol=tol)
    real = valid.cpu()  # (a padding row's ids are all -1: its weights' order is no set's)
    (gw, gi), (rw, ri) = _sorted(w.cpu()[real], ids.cpu()[real]), _sorted(ref_w[real], ref_ids[real])
    assert torch.equal(gi, ri) and torch.allclose(gw, rw, atol=1e-5) and torch.equal(counts.cpu(), ref_counts)


def test_gate_route_topk_is_batch_invariant(gen, kdev, seed):
    T, D, G = FUSED_MAX_TOKENS, 96, 16
    x, gate, _, _, _ = _inputs(gen, T, D, G, "greedy", torch.bfloat16, kdev)
    w_all, ids_all, logits_all = triton_gate_route_topk(x, gate, None, 4, renormalize=True)
    for t in (0, T - 1):
        w, ids, logits = triton_gate_route_topk(x[t:t + 1], gate, None, 4, renormalize=True)
        assert torch.equal(logits[0], logits_all[t]) and torch.equal(ids[0], ids_all[t]), f"seed={seed}"
        assert torch.equal(w[0], w_all[t])


def test_past_the_fused_batch_the_op_runs_unfused(gen, kdev):
    x, gate, _, _, _ = _inputs(gen, FUSED_MAX_TOKENS + 3, 32, 8, "greedy", torch.float32, kdev)
    w, ids, logits = triton_gate_route_topk(x, gate, None, 2)
    ref_w, ref_ids, ref_logits = reference_gate_route_topk(x.cpu(), gate.cpu(), None, 2)
    assert torch.equal(ids.cpu(), ref_ids) and torch.allclose(w.cpu(), ref_w, atol=1e-6)


def test_gate_route_topk_rejects_bad_inputs(gen, kdev):
    x, gate, _, _, _ = _inputs(gen, 2, 32, 8, "greedy", torch.bfloat16, kdev)
    with pytest.raises(ValueError, match="gate_GD"):
        triton_gate_route_topk(x, gate[:, :-1], None, 2)
    with pytest.raises(ValueError, match="top_k"):
        triton_gate_route_topk(x, gate, None, 9)
    with pytest.raises(ValueError, match="counters_T"):
        triton_gate_route_topk(x, gate, None, 2, counters_T=torch.zeros(2, dtype=torch.int32))
