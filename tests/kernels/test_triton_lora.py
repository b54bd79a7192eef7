"""LoRA shrink / expand (kernels/triton_lora.py) against their plain-torch references (kernels/lora.py) and a
float64 per-row loop, at ragged shapes with rows of no adapter (slot -1) between rows of different adapters."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.lora import reference_lora_expand, reference_lora_shrink
from moelink.kernels.triton_lora import triton_lora_expand, triton_lora_shrink


def _loop(x_TK, a_LRK, b_LNR, slots_T, scale_L, y_TN):
    """The oracle: each row alone, in float64."""
    out = y_TN.double().clone()
    for i, s in enumerate(slots_T.tolist()):
        if s >= 0:
            out[i] += float(scale_L[s]) * (b_LNR[s].double() @ (a_LRK[s].double() @ x_TK[i].double()))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,K,N,R,L", [(1, 48, 40, 8, 1), (7, 100, 72, 16, 3), (13, 33, 129, 5, 4), (0, 16, 16, 4, 2)])
def test_lora_shrink_expand_match_reference(T, K, N, R, L, dtype, gen, kdev, check, seed):
    x = torch.randn(T, K, generator=gen).to(dtype)
    a = (torch.randn(L, R, K, generator=gen) / K ** 0.5).to(dtype)
    b = (torch.randn(L, N, R, generator=gen) / R ** 0.5).to(dtype)
    scale = torch.rand(L, generator=gen, dtype=torch.float32) + 0.5
    slots = torch.randint(-1, L, (T,), generator=gen)
    if T > 2:
        slots[0], slots[1] = -1, L - 1  # a row of no adapter and one of the last slot, always
    y = torch.randn(T, N + 3, generator=gen).to(dtype)  # a column view, as a stacked projection's piece
    want = _loop(x, a, b, slots, scale, y[:, 1:N + 1])

    t_ref = reference_lora_shrink(x, a, slots)
    t_got = triton_lora_shrink(x.to(kdev), a.to(kdev), slots.to(kdev))
    assert t_got.shape == (T, R)
    if T == 0:
        return
    assert bool((t_got.cpu()[slots < 0] == 0).all()), "a row of no adapter must shrink to zeros"
    check(t_got.cpu(), (a.double()[slots.clamp_min(0)] @ x.double().unsqueeze(-1)).squeeze(-1)
          * (slots >= 0).unsqueeze(-1), dtype, "lora_shrink")

    y_ref = y.clone()
    reference_lora_expand(y_ref[:, 1:N + 1], t_ref, b, slots, scale)
    y_got = y.clone().to(kdev)
    triton_lora_expand(y_got[:, 1:N + 1], t_ref.to(kdev), b.to(kdev), slots.to(kdev), scale.to(kdev))
    y_got = y_got.cpu()
    # Columns outside the view and rows of no adapter are untouched, exactly.
    assert torch.equal(y_got[:, 0], y[:, 0]) and torch.equal(y_got[:, N + 1:], y[:, N + 1:])
    assert torch.equal(y_got[slots < 0], y[slots < 0])
    check(y_got[:, 1:N + 1], want, dtype, "lora_expand")
    check(y_ref[:, 1:N + 1], want, dtype, "reference_lora_expand")


def test_lora_kernels_refuse_bad_shapes(kdev):
    x = torch.zeros(3, 8, device=kdev)
    with pytest.raises(ValueError, match="one per row"):
        triton_lora_shrink(x, torch.zeros(2, 4, 8, device=kdev), torch.zeros(2, dtype=torch.long, device=kdev))
