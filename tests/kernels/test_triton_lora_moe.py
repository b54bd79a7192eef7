"""Per-expert LoRA on the grouped GEMM's sorted layout (kernels/triton_lora_moe.py) against the plain-torch references
(kernels/lora_moe.py) and float64 per-pair oracles: several experts with uneven pair counts (one with none), top-2,
rows of three different slots and of no adapter inside one expert's block, ranks 4 and 8."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.lora_moe import (ExpertLoRA, reference_lora_fused_moe, reference_sorted_lora_expand,
                                      reference_sorted_lora_shrink)
from moelink.kernels.moe import MoEActivation, reference_fused_moe
from moelink.kernels.moe_align import moe_align_block_size
from moelink.kernels.moe_config import MoELaunchConfig
from moelink.kernels.triton_lora_moe import (triton_lora_fused_moe, triton_sorted_lora_expand,
                                             triton_sorted_lora_shrink)

CFG = MoELaunchConfig.from_dict({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 16, "GROUP_SIZE_M": 1,
                                 "num_warps": 4, "num_stages": 2})
T, E, K, D, I, L = 11, 4, 2, 24, 20, 3


def _case(gen, R, dtype):
    """Routing with uneven counts (expert 3 none, expert 0 most), a padding pick, slots 0, 1, 2 and -1 mixed."""
    ids = torch.stack([torch.tensor([0, 0, 0, 1, 2, 0, 1, 0, 2, 0, 1]),
                       torch.tensor([1, 2, 1, 2, 0, 1, 0, 2, 1, 2, -1])], 1)
    weights = torch.rand(T, K, generator=gen)
    slots = torch.tensor([0, 1, 2, -1, 0, 2, 1, -1, 2, 1, 0])
    x = torch.randn(T, D, generator=gen).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=gen) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen) / I ** 0.5).to(dtype)

    def lora(k_in, n_out):
        a = (torch.randn(L * E, R, k_in, generator=gen) / k_in ** 0.5).to(dtype)
        b = (torch.randn(L * E, n_out, R, generator=gen) / R ** 0.5).to(dtype)
        return ExpertLoRA(a, b, torch.rand(L * E, generator=gen) + 0.5)

    return x, w13, w2, weights, ids, slots, lora(D, 2 * I), lora(I, D)


def _merged(x, w13, w2, weights, ids, slots, gate_up, down):
    """The oracle: each token alone through the plain fused MoE with its adapter merged into every expert's
    weights (W + scale · B A), float64."""
    out = torch.zeros(T, D, dtype=torch.float64)
    for t in range(T):
        s = int(slots[t])
        m13, m2 = w13.double().clone(), w2.double().clone()
        for e in range(E):
            if s >= 0:
                x_ = s * E + e
                m13[e] += float(gate_up.scale_X[x_]) * gate_up.b_XNR[x_].double() @ gate_up.a_XRK[x_].double()
                m2[e] += float(down.scale_X[x_]) * down.b_XNR[x_].double() @ down.a_XRK[x_].double()
        out[t] = reference_fused_moe(x[t:t + 1].double(), m13, m2, weights[t:t + 1].double(), ids[t:t + 1])[0]
    return out


@pytest.mark.parametrize("R", [4, 8])
def test_sorted_shrink_expand_match_reference(R, gen, kdev, check):
    dtype = torch.float32
    x, _, _, weights, ids, slots, gate_up, _ = _case(gen, R, dtype)
    sorted_S, experts_B, _ = moe_align_block_size(ids.reshape(-1), 16, E, None)
    P = T * K
    # gate_up: x gathered by token
    t_ref = reference_sorted_lora_shrink(x.double(), gate_up.a_XRK.double(), slots, sorted_S, experts_B, P, K, E, True)
    dev = lambda t: t.to(kdev)  # noqa: E731
    t_got = triton_sorted_lora_shrink(dev(x), dev(gate_up.a_XRK), dev(slots), dev(sorted_S), dev(experts_B), P, K, E,
                                      gather=True)
    check(t_got.cpu(), t_ref, dtype, "sorted shrink (gather)")
    d_ref = reference_sorted_lora_expand(torch.zeros(sorted_S.numel(), 2 * I, dtype=torch.float64), t_ref,
                                         gate_up.b_XNR.double(), gate_up.scale_X, slots, sorted_S, experts_B, None,
                                         K, E)
    d_got = torch.full((sorted_S.numel(), 2 * I), float("nan"), device=kdev)  # every row written, zeros where none
    triton_sorted_lora_expand(d_got, t_ref.float().to(kdev), dev(gate_up.b_XNR), dev(gate_up.scale_X), dev(slots),
                              dev(sorted_S), dev(experts_B), None, K, E)
    check(d_got.cpu(), d_ref, dtype, "sorted expand (rows)")
    # down: the sorted rows themselves, added into each pair's row times its routed weight
    h = torch.randn(sorted_S.numel(), D, generator=gen)
    t_ref = reference_sorted_lora_shrink(h.double(), gate_up.a_XRK.double(), slots, sorted_S, experts_B, P, K, E, False)
    t_got = triton_sorted_lora_shrink(dev(h), dev(gate_up.a_XRK), dev(slots), dev(sorted_S), dev(experts_B), P, K, E,
                                      gather=False)
    check(t_got.cpu(), t_ref, dtype, "sorted shrink (rows)")
    y = torch.randn(P, 2 * I, generator=gen)
    y_ref = reference_sorted_lora_expand(y.double().clone(), t_ref, gate_up.b_XNR.double(), gate_up.scale_X, slots,
                                         sorted_S, experts_B, weights.reshape(-1), K, E)
    y_got = triton_sorted_lora_expand(dev(y.clone()), t_ref.float().to(kdev), dev(gate_up.b_XNR), dev(gate_up.scale_X),
                                      dev(slots), dev(sorted_S), dev(experts_B), dev(weights.reshape(-1)), K, E).cpu()
    check(y_got, y_ref, dtype, "sorted expand (routed)")
    none = (slots.repeat_interleave(K) < 0) | (ids.reshape(-1) < 0)
    assert torch.equal(y_got[none], y[none]), "pairs of no adapter (or no expert) must be untouched"


@pytest.mark.parametrize("R", [4, 8])
def test_lora_fused_moe_matches_merged_weights(R, gen, kdev, check):
    dtype = torch.float32
    x, w13, w2, weights, ids, slots, gate_up, down = _case(gen, R, dtype)
    want = _merged(x, w13, w2, weights, ids, slots, gate_up, down)
    dbl = lambda lo: ExpertLoRA(lo.a_XRK.double(), lo.b_XNR.double(), lo.scale_X)  # noqa: E731
    ref = reference_lora_fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids, slots, dbl(gate_up),
                                   dbl(down))
    check(ref, want, dtype, "reference_lora_fused_moe")
    dev = lambda t: t.to(kdev)  # noqa: E731
    on = lambda lo: ExpertLoRA(*(dev(t) for t in lo))  # noqa: E731
    got = triton_lora_fused_moe(dev(x), dev(w13), dev(w2), dev(weights), dev(ids), dev(slots), on(gate_up), on(down),
                                config=CFG)
    check(got.cpu(), want, dtype, "triton_lora_fused_moe")
    # One tensor targeted (the other None; rank 4), and no row of an adapter (rank 8): the base experts as the plain
    # path gives them.
    if R == 8:
        base = triton_lora_fused_moe(dev(x), dev(w13), dev(w2), dev(weights), dev(ids), dev(torch.full((T,), -1)),
                                     on(gate_up), on(down), config=CFG)
        check(base.cpu(), reference_fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids), dtype,
              "no adapter")
        return
    got_up = triton_lora_fused_moe(dev(x), dev(w13), dev(w2), dev(weights), dev(ids), dev(slots), on(gate_up), None,
                                   config=CFG)
    check(got_up.cpu(), reference_lora_fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids, slots,
                                                 dbl(gate_up), None), dtype, "gate_up only")


def test_lora_fused_moe_with_expert_biases_and_swiglu(gen, kdev, check):
    """gpt-oss's expert biases and clamped SwiGLU beside both deltas: b13 rides in gate_up's per-row delta (the
    gate-up GEMM's one bias slot), b2 in the down GEMM; against the plain-torch loop in float64."""
    dtype = torch.float32
    x, w13, w2, weights, ids, slots, gate_up, down = _case(gen, 4, dtype)
    b13, b2 = torch.randn(E, 2 * I, generator=gen), torch.randn(E, D, generator=gen)
    act = MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)
    dbl = lambda lo: ExpertLoRA(lo.a_XRK.double(), lo.b_XNR.double(), lo.scale_X)  # noqa: E731
    want = reference_lora_fused_moe(x.double(), w13.double(), w2.double(), weights.double(), ids, slots, dbl(gate_up),
                                    dbl(down), b13_EF=b13.double(), b2_ED=b2.double(), activation=act)
    dev = lambda t: t.to(kdev)  # noqa: E731
    on = lambda lo: ExpertLoRA(*(dev(t) for t in lo))  # noqa: E731
    got = triton_lora_fused_moe(dev(x), dev(w13), dev(w2), dev(weights), dev(ids), dev(slots), on(gate_up), on(down),
                                b13_EF=dev(b13), b2_ED=dev(b2), activation=act, config=CFG)
    check(got.cpu(), want, dtype, "biases + swiglu_oai")


def test_lora_fused_moe_refuses_bad_input(kdev):
    x = torch.zeros(2, 8, device=kdev)
    w13, w2 = torch.zeros(2, 8, 8, device=kdev), torch.zeros(2, 8, 4, device=kdev)
    ids, w = torch.zeros(2, 1, dtype=torch.long, device=kdev), torch.ones(2, 1, device=kdev)
    bad = ExpertLoRA(torch.zeros(3, 4, 8, device=kdev), torch.zeros(3, 8, 4, device=kdev), torch.ones(3, device=kdev))
    with pytest.raises(ValueError, match="not slots x 2 experts"):
        triton_lora_fused_moe(x, w13, w2, w, ids, torch.zeros(2, dtype=torch.long, device=kdev), bad, None)
    with pytest.raises(ValueError, match="one slot per token"):
        triton_lora_fused_moe(x, w13, w2, w, ids, torch.zeros(3, dtype=torch.long, device=kdev), None, None)
