"""The plain-torch experts' per-expert path as contiguous segments of the pairs sorted by expert
(kernels/moe._segmented_experts): bit for bit the loop of per-expert gather / linear / scatter-add it replaces, in
fewer torch ops (a CPU decode step is op dispatch), on a CPU whose elementwise activation gives a value the same
bits wherever it sits in a tensor. Where it does not (ATen's vectorized exp on an AVX-512 Xeon rounds a value by
its position: its vector body or the loop's tail), the joined activation can differ from the loop's per-expert one
in the last bit, and only there: the test checks that this CPU is such a one and the values agree to a few ulps."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moelink.kernels import moe
from moelink.kernels.moe import SILU, MoEActivation, fused_moe_torch


def _loop(x, w13, w2, weights, ids, b13, b2, act, expert_map=None):
    """The per-expert loop (the path's definition): each local expert's tokens gathered, its two linears, the
    routing weight, added into the output in expert order."""
    out = torch.zeros_like(x)
    T, K = ids.shape
    local = ids if expert_map is None else torch.where(ids >= 0, expert_map.long()[ids.clamp(min=0)], -1)
    for e in range(w13.shape[0]):
        pairs = (local.reshape(-1) == e).nonzero().squeeze(1)
        if not pairs.numel():
            continue
        tok = pairs // K
        gate, up = F.linear(x[tok], w13[e], None if b13 is None else b13[e]).chunk(2, -1)
        y = F.linear(act(gate, up), w2[e], None if b2 is None else b2[e])
        y = y * weights.reshape(-1)[pairs][:, None].to(y.dtype)
        out.index_add_(0, tok, y.to(out.dtype))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T,E,K", [(9, 4, 2), (40, 8, 2), (33, 6, 3)])
@pytest.mark.parametrize("streamed", [False, True])  # joined by cats (decode sizes) or one segment at a time (prompts)
def test_segments_are_the_loops_bits(monkeypatch, dtype, bias, T, E, K, streamed):
    monkeypatch.setattr(moe, "STREAMED_MIN_PAIRS", 0 if streamed else 1 << 40)
    g = torch.Generator().manual_seed(T * E + K)
    D, I = 16, 12
    x = torch.randn(T, D, generator=g, dtype=dtype)
    w13 = torch.randn(E, 2 * I, D, generator=g, dtype=dtype)
    w2 = torch.randn(E, D, I, generator=g, dtype=dtype)
    b13 = torch.randn(E, 2 * I, generator=g, dtype=dtype) if bias else None
    b2 = torch.randn(E, D, generator=g, dtype=dtype) if bias else None
    # Skewed: most pairs on expert 0, so the padded path (<= 2x padding) is not taken.
    ids = torch.where(torch.rand(T, K, generator=g) < 0.7, 0, torch.randint(1, E, (T, K), generator=g))
    ids[:, 1] = torch.where(ids[:, 1] == ids[:, 0], (ids[:, 0] + 1) % E, ids[:, 1])
    ids[0, 0] = -1  # a pair with no expert adds nothing
    weights = torch.rand(T, K, generator=g, dtype=torch.float32)
    act = SILU if not bias else MoEActivation("swiglu_oai")
    got = fused_moe_torch(x, w13, w2, weights, ids, b13_EF=b13, b2_ED=b2, activation=act, padded_max_pairs=0)
    want = _loop(x, w13, w2, weights, ids, b13, b2, act)
    if not torch.equal(got, want):
        assert _activation_is_positional(act, dtype), "the segments differ from the loop beyond the activation"
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(got, want, rtol=16 * eps, atol=16 * eps * float(want.abs().max()))


def _activation_is_positional(act, dtype) -> bool:
    """Whether on this CPU the activation of a value depends on where it sits in the tensor (slices of one tensor
    against the whole)."""
    g = torch.Generator().manual_seed(1)
    gate, up = torch.randn(99, 12, generator=g, dtype=dtype) * 3, torch.randn(99, 12, generator=g, dtype=dtype)
    whole = act(gate, up)
    return any(not torch.equal(act(gate[s: s + n].clone(), up[s: s + n].clone()), whole[s: s + n])
               for s in range(0, 90, 7) for n in (1, 2, 3, 5, 9))


def test_segments_leave_out_another_ranks_experts():
    g = torch.Generator().manual_seed(3)
    T, D, I, G, K = 12, 8, 6, 6, 2
    expert_map = torch.tensor([0, -1, 1, -1, 2, -1], dtype=torch.int32)  # global -> local (-1: another rank's)
    w13, w2 = torch.randn(3, 2 * I, D, generator=g), torch.randn(3, D, I, generator=g)
    x, weights = torch.randn(T, D, generator=g), torch.rand(T, K, generator=g)
    ids = torch.stack([torch.randperm(G, generator=g)[:K] for _ in range(T)])
    got = fused_moe_torch(x, w13, w2, weights, ids, expert_map, padded_max_pairs=0)
    assert torch.equal(got, _loop(x, w13, w2, weights, ids, None, None, SILU, expert_map))
