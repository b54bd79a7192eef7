"""Kimi Delta Attention (KDA): the gated delta rule with a decay per key channel, g [T, N, K], through the same
functions as gated DeltaNet (kernels/gated_delta.py, kernels/triton_gated_delta.py). The reference against
transformers' own KDA functions (the oracle: recurrent_kimi_delta_attention / chunk_kimi_delta_attention, as Kimi
Linear calls them), and the Triton recurrence against the float64 reference on ragged batches: slots, new and
continued sequences, a padding row, a prefill split into chunks, the verify step's intermediate states and the
replay of accepted tokens. A per-head decay broadcast to every channel gives gated DeltaNet's result."""
from __future__ import annotations

import pytest
import torch
from transformers.models.kimi_linear import modeling_kimi_linear as hf

from moelink.kernels.gated_delta import (reference_gated_delta_rule, reference_gated_delta_rule_decode,
                                         reference_replay_gated_delta_state)

N, K = 4, 16  # KDA: one q/k head per value head, K = V
LENS = [1, 3, 17, 69]
P = 8


def _qsl(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def _inputs(gen, lens, dtype):
    """q, k, v as strided views of one convolved [T, 3 N K] tensor; g per channel as Kimi Linear's forget gate makes it
    (-exp(A_log) softplus(x + dt_bias), <= 0); beta."""
    T = sum(lens)
    qkv = torch.randn(T, 3 * N * K, generator=gen)
    q, k, v = (qkv[:, i * N * K:(i + 1) * N * K].view(T, N, K) for i in range(3))
    g = -torch.rand(N, 1, generator=gen).exp() * torch.nn.functional.softplus(torch.randn(T, N, K, generator=gen))
    beta = torch.rand(T, N, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype)


@pytest.mark.parametrize("with_state", [False, True], ids=["new", "continued"])
def test_reference_matches_transformers_recurrent_and_chunked(gen, with_state, seed):
    q, k, v, g, beta = (x.double() for x in _inputs(gen, LENS, torch.float64))
    pool = 0.1 * torch.randn(P, N, K, K, generator=gen, dtype=torch.float64)
    slots = torch.tensor([5, 0, 3, 6], dtype=torch.int32)
    got_pool = pool.clone()
    o = reference_gated_delta_rule(q, k, v, g, beta, got_pool, _qsl(LENS), slots, torch.full((4,), with_state))
    qsl = _qsl(LENS).tolist()
    for s in range(len(LENS)):
        rows = slice(qsl[s], qsl[s + 1])
        init = pool[slots[s]][None].clone() if with_state else None
        args = [x[rows][None] for x in (q, k, v, g, beta)]
        for fn in (hf.recurrent_kimi_delta_attention, hf.chunk_kimi_delta_attention):
            want, want_state = fn(*args, initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True)
            # transformers computes in float32 whatever the inputs: agreement to float32's rounding.
            torch.testing.assert_close(o[rows], want[0].double(), rtol=1e-5, atol=1e-5, msg=f"o, seq {s} (seed={seed})")
            torch.testing.assert_close(got_pool[slots[s]], want_state[0].double(), rtol=1e-5, atol=1e-5)


def test_a_decay_per_head_broadcast_to_every_channel_is_gated_deltanet(gen, seed):
    q, k, v, _, beta = (x.double() for x in _inputs(gen, LENS, torch.float64))
    g_TN = -torch.rand(sum(LENS), N, generator=gen, dtype=torch.float64)
    slots = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    p1, p2 = torch.zeros(P, N, K, K, dtype=torch.float64), torch.zeros(P, N, K, K, dtype=torch.float64)
    o1 = reference_gated_delta_rule(q, k, v, g_TN, beta, p1, _qsl(LENS), slots)
    o2 = reference_gated_delta_rule(q, k, v, g_TN[..., None].expand(-1, -1, K), beta, p2, _qsl(LENS), slots)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_triton_recurrence_matches_float64_reference(gen, kdev, check, dtype, seed):
    from moelink.kernels.triton_gated_delta import triton_gated_delta_rule

    lens = [1, 3, 17, 9]
    q, k, v, g, beta = _inputs(gen, lens, dtype)
    pool = 0.1 * torch.randn(P, N, K, K, generator=gen)
    slots = torch.tensor([3, -1, 5, 1], dtype=torch.int32)  # continued, a padding row, new, continued
    has_init = torch.tensor([True, True, False, True])
    want_pool = pool.double()
    want = reference_gated_delta_rule(*(x.double() for x in (q, k, v, g, beta)), want_pool, _qsl(lens), slots, has_init)
    got_pool = pool.clone().to(kdev)
    dev = [x.to(kdev) for x in (q, k, v, g, beta, _qsl(lens), slots, has_init)]
    got = triton_gated_delta_rule(*dev[:5], got_pool, *dev[5:])
    check(got, want, dtype, f"o {lens}")
    check(got_pool, want_pool, torch.float32, "pool")
    untouched = [i for i in range(P) if i not in set(slots.tolist())]
    assert torch.equal(got_pool.cpu()[untouched], pool[untouched]), f"slots no sequence owns changed (seed={seed})"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_verify_keeps_states_and_replay_advances_by_the_accepted(gen, kdev, backend, seed):
    """A verify step of 4 tokens per sequence leaves the pool alone, keeps the states after each token, and replaying
    the accepted ones (0..4) moves each slot to exactly the kept state of its last accepted token."""
    if backend == "triton":
        from moelink.kernels.triton_gated_delta import (triton_gated_delta_rule_decode as decode,
                                                        triton_replay_gated_delta_state as replay)
    else:
        decode, replay = reference_gated_delta_rule_decode, reference_replay_gated_delta_state
    lens = [4, 4, 4]
    q, k, v, g, beta = (x.to(kdev) for x in _inputs(gen, lens, torch.float32))
    pool = (0.1 * torch.randn(P, N, K, K, generator=gen)).to(kdev)
    slots = torch.tensor([2, 6, 0], dtype=torch.int32, device=kdev)
    qsl = _qsl(lens).to(kdev)
    kept = torch.zeros(3, 4, N, K, K, device=kdev)
    before = pool.clone()
    decode(q, k, v, g, beta, pool, qsl, slots, intermediate_states_SQNKV=kept)
    assert torch.equal(pool, before), "a verify step writes no slot"
    accepted = torch.tensor([0, 2, 4], dtype=torch.int32, device=kdev)
    replay(k, v, g, beta, pool, qsl, slots, accepted)
    torch.testing.assert_close(pool[2], before[2], rtol=0, atol=0)  # none accepted: the slot as it was
    torch.testing.assert_close(pool[6], kept[1, 1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pool[0], kept[2, 3], rtol=1e-5, atol=1e-6)


def test_a_decay_of_the_wrong_shape_is_named(gen):
    q, k, v, g, beta = _inputs(gen, [3], torch.float32)
    pool = torch.zeros(P, N, K, K)
    with pytest.raises(ValueError, match=r"g_TN \(3, 4, 8\) must be \[T=3, N=4\] \(a decay per head\) or \[T, N, K=16\]"):
        reference_gated_delta_rule(q, k, v, g[..., :8], beta, pool, _qsl([3]), torch.tensor([0], dtype=torch.int32))
