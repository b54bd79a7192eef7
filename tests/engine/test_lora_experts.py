"""Routed experts with per-expert LoRA (engine/lora/experts.py) against merged weights: each token run alone through
kernels/moe.py's reference with its adapter's deltas added to every expert's weights (W_e + scale · B_e A_e), in
float64, at ragged shapes: rows of different adapters, rows of none, padding ids (-1), experts no row reaches."""
from __future__ import annotations

import pytest
import torch

from moelink.engine.lora.experts import lora_fused_moe
from moelink.engine.lora.layer import LoRAPiece
from moelink.kernels.moe import reference_fused_moe
from moelink.kernels.ops import ReferenceKernels


def _piece(g, L, E, R, K, N, ranks):
    """Stacks of L slots x E experts, slot s's adapter at rank ranks[s] (zero-padded to R)."""
    a = torch.zeros(L * E, R, K, dtype=torch.float64)
    b = torch.zeros(L * E, N, R, dtype=torch.float64)
    for s, r in enumerate(ranks):
        a[s * E:(s + 1) * E, :r] = torch.randn(E, r, K, generator=g, dtype=torch.float64)
        b[s * E:(s + 1) * E, :, :r] = torch.randn(E, N, r, generator=g, dtype=torch.float64) * 0.3
    scale = torch.rand(L, generator=g, dtype=torch.float64).float().repeat_interleave(E) + 0.5
    return LoRAPiece(None, a, b, scale, covered=set(range(L)))


@pytest.mark.parametrize("T,E,K,D,I,L", [(1, 4, 2, 16, 8, 1), (9, 6, 2, 24, 12, 3), (13, 5, 3, 16, 20, 2)])
def test_lora_experts_equal_merged_weights(T, E, K, D, I, L):
    g = torch.Generator().manual_seed(T * 100 + E)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, 2 * I, D, generator=g, dtype=torch.float64) / D ** 0.5
    w2 = torch.randn(E, D, I, generator=g, dtype=torch.float64) / I ** 0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    ids[0, -1] = -1  # a padding pick
    weights = torch.rand(T, K, generator=g, dtype=torch.float64)
    slots = torch.randint(-1, L, (T,), generator=g)
    if T > 2:
        slots[1], slots[2] = -1, L - 1
    ranks = [max(1, 4 - s) for s in range(L)]
    gu, dn = _piece(g, L, E, 4, D, 2 * I, ranks), _piece(g, L, E, 4, I, D, ranks)
    got = lora_fused_moe(ReferenceKernels(), x, w13, w2, weights, ids, slots, gu, dn)
    for t in range(T):
        s = int(slots[t])
        w13_t, w2_t = w13.clone(), w2.clone()
        if s >= 0:
            rows = slice(s * E, (s + 1) * E)
            w13_t += gu.scale_X[rows, None, None].double() * (gu.b_XNR[rows] @ gu.a_XRK[rows])
            w2_t += dn.scale_X[rows, None, None].double() * (dn.b_XNR[rows] @ dn.a_XRK[rows])
        want = reference_fused_moe(x[t:t + 1], w13_t, w2_t, weights[t:t + 1], ids[t:t + 1])
        torch.testing.assert_close(got[t:t + 1], want, rtol=1e-10, atol=1e-12)
    # Rows of no adapter are the base experts' output exactly as the fused reference gives it.
    base = reference_fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got[slots < 0], base[slots < 0], rtol=1e-12, atol=1e-13)


def test_slot_table_keeps_held_slots_and_evicts_the_least_recently_used():
    """The driver's slot table under DP attention (engine/lora/slot_table.py): an adapter keeps its slot while steps
    need it, a new one takes an empty slot, then the least recently used one the step does not need; more adapters in
    one step than slots is an error (the schedulers' max_loras never allow it)."""
    from moelink.engine.contract.lora import LoRARequest
    from moelink.engine.lora.slot_table import SlotTable

    a, b, c, d = (LoRARequest(n, i + 1, f"/x/{n}") for i, n in enumerate("abcd"))
    t = SlotTable(3)
    assert t.assign([a, a]) == (a, None, None)
    assert t.assign([b]) == (a, b, None)
    assert t.assign([c, a]) == (a, b, c)
    assert t.assign([d, a]) == (a, d, c)  # b least recently used of the slots the step does not need
    assert t.assign([b, c, d]) == (b, d, c)
    with pytest.raises(RuntimeError, match="4 adapters in one step, over its 3 slots"):
        t.assign([a, b, c, d])


def test_a_rank_reads_ahead_the_adapters_the_driver_announces():
    """A rank in another process (Ray) reads the adapters the driver holds requests for on its own thread
    (engine/lora/slots.py HostAdapters.prefetch, SchedulerOutput.lora_prefetch): the step loop's `get` then takes the
    read (waiting only for its rest) and never reads again; reads ahead for requests that never come are dropped past
    the LRU's capacity."""
    import threading

    from moelink.engine.contract.lora import LoRARequest
    from moelink.engine.lora.slots import HostAdapters

    a, b, c = (LoRARequest(n, i + 1, f"/x/{n}") for i, n in enumerate("abc"))
    release, reads = threading.Event(), []

    def read(req):
        reads.append((req.lora_name, threading.current_thread().name))
        release.wait(5)
        return req.lora_name

    host = HostAdapters(2, read)
    host.prefetch([a])
    host.prefetch([a])  # once
    release.set()
    assert host.get(a) == "a" and host.get(a) == "a"
    assert reads == [("a", reads[0][1])] and reads[0][1] != threading.current_thread().name
    host.prefetch([b, c, a])  # a is held: only b and c are read
    assert host.get(c) == "c" and sorted(n for n, _ in reads) == ["a", "b", "c"]
    host.prefetch([LoRARequest(n, i + 10, f"/x/{n}") for i, n in enumerate("defg")])
    assert len(host._reading) <= 2
