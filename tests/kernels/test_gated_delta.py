"""The gated delta rule (kernels/gated_delta.py, kernels/triton_gated_delta.py): the reference against transformers'
own torch functions (the oracle: torch_recurrent_gated_delta_rule / torch_chunk_gated_delta_rule, as Qwen3-Next and
Qwen3.5-MoE call them), its chunked and recurrent forms against each other in float64, and the Triton recurrence
against the float64 reference on ragged batches: slots, new sequences, padding rows, prefill split anywhere,
decodes after a prefill, and speculative decoding's intermediate states and commit (the rollback)."""
from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from moelink.kernels.gated_delta import (reference_commit_states, reference_gated_delta_rule,
                                         reference_gated_delta_rule_decode, reference_gdn_gating,
                                         reference_replay_gated_delta_state)

G, N, K, V = 2, 4, 16, 32  # 2 q/k heads, 4 value heads (each q/k head serves two), Qwen3-Next's shape in miniature
LENS = [1, 3, 17, 69]  # a decode, a draft-sized run, a short prompt, a prompt past one 64-chunk
P = 8


def _qsl(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def _inputs(gen, lens, dtype, n=N, g_=G, k_=K, v_=V):
    """q, k, v as the convolved qkv (strided views of one [T, 2 G K + N V] tensor), g from the models' gating, beta."""
    T = sum(lens)
    qkv = torch.randn(T, 2 * g_ * k_ + n * v_, generator=gen)
    q = qkv[:, : g_ * k_].view(T, g_, k_)
    k = qkv[:, g_ * k_: 2 * g_ * k_].view(T, g_, k_)
    v = qkv[:, 2 * g_ * k_:].view(T, n, v_)
    a, b = torch.randn(T, n, generator=gen), torch.randn(T, n, generator=gen)
    g, beta = reference_gdn_gating(a, b, torch.rand(n, generator=gen).log() - 1.0, torch.randn(n, generator=gen))
    return q.to(dtype), k.to(dtype), v.to(dtype), g, beta.to(dtype)


def _pool(gen, n=N, k_=K, v_=V):
    return 0.1 * torch.randn(P, n, k_, v_, generator=gen)


def _f64(*xs):
    return [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in xs]


def _dev(xs, kdev):
    return [x.to(kdev) if isinstance(x, torch.Tensor) else x for x in xs]


@pytest.mark.parametrize("with_state", [False, True], ids=["new", "continued"])
def test_reference_matches_transformers_recurrent_and_chunked(gen, with_state, seed):
    q, k, v, g, beta = _inputs(gen, LENS, torch.float64)
    pool = _pool(gen).double()
    slots = torch.tensor([5, 0, 3, 6], dtype=torch.int32)
    has_init = torch.full((4,), with_state)
    got_pool = pool.clone()
    o = reference_gated_delta_rule(q, k, v, g, beta, got_pool, _qsl(LENS), slots, has_init)
    qsl = _qsl(LENS).tolist()
    for s in range(len(LENS)):
        rows = slice(qsl[s], qsl[s + 1])
        init = pool[slots[s]][None].clone() if with_state else None
        args = [x[rows][None] for x in (q, k, v, g, beta)]
        for fn in (hf.torch_recurrent_gated_delta_rule, hf.torch_chunk_gated_delta_rule):
            want, want_state = fn(*args, initial_state=init, output_final_state=True, use_qk_l2norm_in_kernel=True)
            # transformers computes in float32 whatever the inputs: agreement to float32's rounding.
            torch.testing.assert_close(o[rows], want[0].double(), rtol=1e-5, atol=1e-5, msg=f"o, seq {s} (seed={seed})")
            torch.testing.assert_close(got_pool[slots[s]], want_state[0].double(), rtol=1e-5, atol=1e-5)


def test_reference_chunked_and_recurrent_forms_agree_in_float64(gen, seed):
    """Long sequences take the chunked form, short ones the batched recurrence: the decode entry point runs every
    sequence through the recurrence, so the two must agree to float64 rounding (padding row and empty sequence too)."""
    lens = [130, 2, 0, 69, 5]
    q, k, v, g, beta = _inputs(gen, lens, torch.float64)
    pool = _pool(gen).double()
    slots = torch.tensor([1, 4, 2, -1, 7], dtype=torch.int32)
    p1, p2 = pool.clone(), pool.clone()
    o1 = reference_gated_delta_rule(q, k, v, g, beta, p1, _qsl(lens), slots)
    o2 = reference_gated_delta_rule_decode(q, k, v, g, beta, p2, _qsl(lens), slots)
    torch.testing.assert_close(o1, o2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-12)
    assert torch.equal(p1[[0, 3, 5, 6]], pool[[0, 3, 5, 6]]), "slots no sequence owns changed"
    assert torch.equal(p1[2], pool[2]), "an empty sequence keeps its state"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_triton_recurrence_matches_float64_reference(gen, kdev, check, dtype, seed):
    from moelink.kernels.triton_gated_delta import triton_gated_delta_rule

    lens = LENS if dtype == torch.float32 else [1, 3, 17]
    q, k, v, g, beta = _inputs(gen, lens, dtype)
    pool = _pool(gen)
    # A continued sequence, a padding row (slot -1: zeros in, nothing written), a new one, another continued one.
    slots = torch.tensor([3, -1, 5, 1][: len(lens)], dtype=torch.int32)
    has_init = torch.tensor([True, True, False, True][: len(lens)])
    want_pool = pool.double()
    want = reference_gated_delta_rule(*_f64(q, k, v, g, beta), want_pool, _qsl(lens), slots, has_init)
    got_pool = pool.clone().to(kdev)
    got = triton_gated_delta_rule(*_dev((q, k, v, g, beta), kdev), got_pool, *_dev((_qsl(lens), slots, has_init), kdev))
    check(got, want, dtype, f"o {lens}")
    check(got_pool, want_pool, torch.float32, "pool")  # states are fp32 whatever the activations
    untouched = [i for i in range(P) if i not in set(slots.tolist())]
    assert torch.equal(got_pool.cpu()[untouched], pool[untouched]), f"slots no sequence owns changed (seed={seed})"


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_prefill_split_anywhere_and_decodes_after_it_equal_one_pass(gen, kdev, backend, seed):
    """A 69-token prompt in one pass == in chunks [20, 1, 41, 7] (each continuing from the state) == 66 tokens of
    prefill and 3 single-token decode steps (the decode entry point, batch of two with a padding row)."""
    if backend == "triton":
        from moelink.kernels.triton_gated_delta import triton_gated_delta_rule as rule
        from moelink.kernels.triton_gated_delta import triton_gated_delta_rule_decode as decode
    else:
        rule, decode = reference_gated_delta_rule, reference_gated_delta_rule_decode
    L = 69
    q, k, v, g, beta = _dev(_inputs(gen, [L], torch.float32), kdev)
    pool = _pool(gen).to(kdev)
    slot = torch.tensor([2], dtype=torch.int32, device=kdev)
    new, cont = torch.tensor([False], device=kdev), torch.tensor([True], device=kdev)
    one_pool = pool.clone()
    o_one = rule(q, k, v, g, beta, one_pool, _qsl([L]).to(kdev), slot, new)
    split_pool, outs, a = pool.clone(), [], 0
    for i, n in enumerate([20, 1, 41, 7]):
        rows = slice(a, a + n)
        outs.append(rule(q[rows], k[rows], v[rows], g[rows], beta[rows], split_pool, _qsl([n]).to(kdev), slot,
                         new if i == 0 else cont))
        a += n
    torch.testing.assert_close(torch.cat(outs), o_one, rtol=2e-5, atol=2e-5, msg=f"split outputs (seed={seed})")
    torch.testing.assert_close(split_pool, one_pool, rtol=2e-5, atol=2e-5, msg=f"split state (seed={seed})")

    dec_pool, a = pool.clone(), 66
    outs = [rule(q[:a], k[:a], v[:a], g[:a], beta[:a], dec_pool, _qsl([a]).to(kdev), slot, new)]
    pad = torch.tensor([2, -1], dtype=torch.int32, device=kdev)
    for t in range(a, L):  # each step: this sequence's token and a padding row's (a copy of it)
        two = [torch.cat([x[t: t + 1], x[t: t + 1]]) for x in (q, k, v, g, beta)]
        outs.append(decode(*two, dec_pool, torch.tensor([0, 1, 2], dtype=torch.int32, device=kdev), pad)[:1])
    torch.testing.assert_close(torch.cat(outs), o_one, rtol=2e-5, atol=2e-5, msg=f"decode outputs (seed={seed})")
    torch.testing.assert_close(dec_pool, one_pool, rtol=2e-5, atol=2e-5, msg=f"decode state (seed={seed})")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_verify_keeps_intermediate_states_and_commit_rolls_back(gen, kdev, check, backend, seed):
    """Speculative verify: three sequences run 4, 3 and 1 tokens (last accepted + drafts) with Q = 4 kept states;
    the pool is untouched; committing num_accepted = (2, 3, 0) leaves each slot at the state after its accepted
    tokens: the same as a plain decode over just those tokens, and slot unchanged for 0."""
    if backend == "triton":
        from moelink.kernels.triton_gated_delta import triton_commit_states as commit
        from moelink.kernels.triton_gated_delta import triton_gated_delta_rule_decode as decode
        from moelink.kernels.triton_gated_delta import triton_replay_gated_delta_state as replay
    else:
        commit, decode = reference_commit_states, reference_gated_delta_rule_decode
        replay = reference_replay_gated_delta_state
    lens, Q = [4, 3, 1], 4
    q, k, v, g, beta = _dev(_inputs(gen, lens, torch.float32), kdev)
    pool = _pool(gen).to(kdev)
    slots = torch.tensor([6, 1, 4], dtype=torch.int32, device=kdev)
    qsl = _qsl(lens).to(kdev)
    inter = torch.full((3, Q, N, K, V), float("nan"), device=kdev)
    got_pool = pool.clone()
    o = decode(q, k, v, g, beta, got_pool, qsl, slots, inter)
    assert torch.equal(got_pool, pool), f"a verify step must not write the pool (seed={seed})"
    # Each kept state is the state after that many tokens: a plain decode over the first j + 1 tokens.
    want_pool = pool.double()
    want_o = reference_gated_delta_rule_decode(*_f64(q, k, v, g, beta), want_pool, qsl, slots)
    check(o, want_o, torch.float32, "o")
    for s, n in enumerate(lens):
        a = int(qsl[s])
        for j in range(Q):
            if j >= n:
                assert inter[s, j].isnan().all(), f"state {j} of a {n}-token sequence was written (seed={seed})"
                continue
            p = pool.double()
            reference_gated_delta_rule_decode(*[x[a: a + j + 1] for x in _f64(q, k, v, g, beta)], p,
                                              _qsl([j + 1]).to(kdev), slots[s: s + 1])
            check(inter[s, j], p[slots[s]], torch.float32, f"state after token {j} of sequence {s}")
    accepted = torch.tensor([2, 3, 0], dtype=torch.int32, device=kdev)
    commit(got_pool, slots, inter, accepted)
    for s, n in enumerate(accepted.tolist()):
        slot = int(slots[s])
        want = pool[slot] if n == 0 else inter[s, n - 1]
        assert torch.equal(got_pool[slot], want), f"slot {slot} after commit of {n} (seed={seed})"
    # Without buffers: a verify step given Q = 0 writes nothing, and the accepted tokens re-run from the slots.
    replay_pool = pool.clone()
    o_none = decode(q, k, v, g, beta, replay_pool, qsl, slots, inter[:, :0])
    assert torch.equal(replay_pool, pool) and torch.equal(o_none, o), f"seed={seed}"
    replay(k, v, g, beta, replay_pool, qsl, slots, accepted)
    torch.testing.assert_close(replay_pool, got_pool, rtol=1e-6, atol=1e-6, msg=f"replay vs commit (seed={seed})")


def test_triton_gating_matches_reference(gen, kdev, seed):
    from moelink.kernels.triton_gated_delta import triton_gdn_gating

    a = 8 * torch.randn(9, N, generator=gen)  # past softplus's threshold of 20 too
    b = torch.randn(9, N, generator=gen).bfloat16()
    A_log, dt_bias = torch.rand(N, generator=gen).log(), torch.randn(N, generator=gen)
    g, beta = triton_gdn_gating(*_dev((a, b, A_log, dt_bias), kdev))
    want_g, want_beta = reference_gdn_gating(a, b, A_log, dt_bias)
    assert g.dtype == torch.float32 and beta.dtype == torch.bfloat16
    torch.testing.assert_close(g.cpu(), want_g, rtol=1e-5, atol=1e-6, msg=f"seed={seed}")
    torch.testing.assert_close(beta.cpu(), want_beta, rtol=1e-2, atol=0, msg=f"seed={seed}")


def test_bad_inputs_are_named(gen, kdev):
    from moelink.kernels.triton_gated_delta import triton_gated_delta_rule

    q, k, v, g, beta = _inputs(gen, [3], torch.float32)
    qsl, slot = _qsl([3]), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match="not a multiple of the G=2"):
        reference_gated_delta_rule(q, k, v[:, :3], g[:, :3], beta[:, :3], _pool(gen)[:, :3], qsl, slot)
    with pytest.raises(ValueError, match=r"state_pool_PNKV \(8, 4, 16, 16\) must be"):
        reference_gated_delta_rule(q, k, v, g, beta, _pool(gen, v_=16), qsl, slot)
    with pytest.raises(ValueError, match="slot_ids_S"):
        reference_gated_delta_rule(q, k, v, g, beta, _pool(gen), qsl, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="float32 pool"):
        triton_gated_delta_rule(*_dev((q, k, v, g, beta, _pool(gen).double(), qsl, slot), kdev))
    with pytest.raises(ValueError, match="intermediate_states_SQNKV"):
        reference_gated_delta_rule_decode(q, k, v, g, beta, _pool(gen), qsl, slot, torch.zeros(1, 2, N, K, V + 1))
