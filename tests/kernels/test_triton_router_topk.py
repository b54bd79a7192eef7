"""The fused router top-k (kernels/triton_router_topk.py) against its reference (kernels/router_topk.py, the math
moe/router.py's strategies run) and a float64 oracle of the weights."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.router_topk import reference_route_topk
from moelink.kernels.triton_router_topk import triton_route_topk


def _logits(gen, T, G, dtype):
    """Distinct per row, exactly representable in bf16 (k/8, k < 256), shuffled: no ties for top-k to break."""
    rows = [(torch.randperm(G, generator=gen).float() - G / 2) / 8 for _ in range(T)]
    return torch.stack(rows).to(dtype) if rows else torch.zeros(0, G, dtype=dtype)


def _by_id(w_TK, ids_TK):
    """(weights, ids) of each row ordered by weight, largest first (distinct logits: distinct weights): the
    grouped methods' order is unspecified, and a padding row's ids are all -1."""
    order = (-w_TK).argsort(dim=-1, stable=True)
    return w_TK.gather(1, order), ids_TK.gather(1, order)


# (T, G, K, method, renormalize, scale, n_group, topk_group, bias): Qwen3 (128 experts, top-8, renormalised),
# DeepSeek-V2-Lite greedy (64, top-6, not renormalised), V2 group-limited with groups of 5 (not a power of two),
# V3 noaux_tc with a bias and 2 of 4 groups, every group kept (no ranking), ragged T.
CASES = [(1, 128, 8, "greedy", True, 1.0, 1, 1, False), (3, 64, 6, "greedy", False, 1.0, 1, 1, False),
         (5, 20, 3, "greedy", True, 2.5, 1, 1, False), (2, 20, 3, "group_limited_greedy", False, 16.0, 4, 2, False),
         (3, 24, 4, "group_limited_greedy", True, 1.0, 3, 1, False), (4, 32, 4, "noaux_tc", True, 2.5, 4, 2, True),
         (1, 24, 3, "noaux_tc", False, 1.0, 6, 6, True), (2, 40, 5, "noaux_tc", True, 1.0, 8, 3, False),
         # DeepSeek-V4: sqrt(softplus) scores, selection on scores + bias, no groups (V4-Flash: 256 experts, top-6)
         (3, 256, 6, "sqrtsoftplus", True, 1.5, 1, 1, True), (2, 24, 4, "sqrtsoftplus", True, 1.0, 1, 1, False)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,G,K,method,renorm,scale,P,TP,bias", CASES)
def test_route_topk_matches_reference(T, G, K, method, renorm, scale, P, TP, bias, dtype, gen, kdev, seed):
    logits = _logits(gen, T, G, dtype)
    bias_G = (torch.randn(G, generator=gen) * 0.01) if bias else None
    valid = torch.ones(T, dtype=torch.bool)
    if T > 1:
        valid[-1] = False  # a padding row of a decode graph: ids -1, counted nowhere
    args = dict(method=method, renormalize=renorm, scale=scale, n_group=P, topk_group=TP)
    counts = torch.randint(0, 5, (G,), generator=gen)
    got_counts = counts.clone().to(kdev)
    w, ids = triton_route_topk(logits.to(kdev), K, **args, bias_G=None if bias_G is None else bias_G.to(kdev),
                               valid_T=valid.to(kdev), counts_G=got_counts)
    want_counts = counts.clone()
    want_w, want_ids = reference_route_topk(logits, K, **args, bias_G=bias_G, valid_T=valid, counts_G=want_counts)
    assert w.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (T, K)
    w, ids = w.cpu(), ids.cpu()
    if method == "greedy":  # torch.topk's sorted order: the same order
        assert torch.equal(ids, want_ids), f"ids {ids} != {want_ids} (seed={seed})"
    else:
        w, ids = _by_id(w, ids)
        want_w, want_ids = _by_id(want_w, want_ids)
        assert torch.equal(ids, want_ids), f"ids {ids} != {want_ids} (seed={seed})"
    # fp32 sums associate differently (module docstring): an ulp or two.
    torch.testing.assert_close(w, want_w, rtol=4e-7, atol=1e-9)
    assert torch.equal(got_counts.cpu(), want_counts), "expert-load counts differ"
    # Against float64 (the reference in float64 arithmetic on the same logits): the weights' accuracy.
    w64, ids64 = reference_route_topk(logits.double(), K, **args, bias_G=None if bias_G is None else bias_G.double())
    if method != "greedy":
        w64, ids64 = _by_id(w64, ids64)
    torch.testing.assert_close(w, w64.float().masked_fill(~valid[:, None], 0) + w.masked_fill(valid[:, None], 0),
                               rtol=1e-5, atol=1e-7)


def test_sqrtsoftplus_scores_past_the_softplus_threshold_and_far_below_zero(kdev):
    """softplus is x past 20 and log1p(e^x) below it (torch's threshold): logits on both sides, and far negative ones
    (e^x tiny: where log(1 + e^x) would lose every digit) chosen through the bias."""
    logits = torch.tensor([[25.0, 19.5, 21.0, -12.0, -30.0, 0.5, -3.0, 2.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 40.0, 0.0, 0.0, 0.0, 0.0])
    w, ids = triton_route_topk(logits.to(kdev), 4, method="sqrtsoftplus", renormalize=True, bias_G=bias.to(kdev))
    w64, ids64 = reference_route_topk(logits.double(), 4, method="sqrtsoftplus", renormalize=True,
                                      bias_G=bias.double())
    w, ids = _by_id(w.cpu(), ids.cpu())
    w64, ids64 = _by_id(w64, ids64)
    assert torch.equal(ids, ids64) and 3 in ids[0].tolist()
    torch.testing.assert_close(w.double(), w64, rtol=2e-6, atol=0)


def test_route_topk_without_mask_or_counts_and_empty(gen, kdev):
    logits = _logits(gen, 2, 16, torch.float32)
    w, ids = triton_route_topk(logits.to(kdev), 4, renormalize=True)
    want_w, want_ids = reference_route_topk(logits, 4, renormalize=True)
    assert torch.equal(ids.cpu(), want_ids)
    torch.testing.assert_close(w.cpu(), want_w, rtol=4e-7, atol=1e-9)
    w, ids = triton_route_topk(torch.zeros(0, 16, device=kdev), 4)
    assert w.shape == ids.shape == (0, 4)


def test_route_topk_rejects_bad_inputs(kdev):
    logits = torch.zeros(2, 16, device=kdev)
    with pytest.raises(ValueError, match="method='top1' is invalid"):
        triton_route_topk(logits, 2, method="top1")
    with pytest.raises(ValueError, match="bias_G is only taken"):
        triton_route_topk(logits, 2, bias_G=torch.zeros(16, device=kdev))
    with pytest.raises(ValueError, match="n_group=3"):
        triton_route_topk(logits, 2, method="noaux_tc", n_group=3, topk_group=1)
    with pytest.raises(ValueError, match="counts_G"):
        triton_route_topk(logits, 2, counts_G=torch.zeros(16, dtype=torch.int32, device=kdev))
