"""The short causal convolution before gated DeltaNet (kernels/causal_conv1d.py, kernels/triton_causal_conv1d.py):
the reference against transformers' causal_conv1d_fn / causal_conv1d_update (the oracle), the Triton kernels against
the float64 reference on ragged batches with conv states by slot, a prefill split anywhere, decodes after a prefill,
and a verify step's intermediate states with their commit."""
from __future__ import annotations

import pytest
import torch
from transformers.models.qwen3_next import modeling_qwen3_next as hf

from moelink.kernels.causal_conv1d import (reference_causal_conv1d, reference_causal_conv1d_update,
                                           reference_replay_conv_state)
from moelink.kernels.gated_delta import reference_commit_states

C, W, P = 40, 4, 8  # channels over three 16-channel blocks in the interpreter's config; Qwen3-Next's kernel width
LENS = [1, 3, 17, 0, 2]  # a decode-length sequence, short ones (shorter than the state), a prompt, an empty one


def _qsl(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def _inputs(gen, T, dtype, bias=False):
    x = torch.randn(T, 2 * C, generator=gen)[:, :C]  # a strided view, as the split of a projection passes it
    w = torch.randn(C, W, generator=gen) / 2
    b = torch.randn(C, generator=gen) if bias else None
    pool = torch.randn(P, W - 1, C, generator=gen)
    return x.to(dtype), w.to(dtype), (b.to(dtype) if bias else None), pool.to(dtype)


def _f64(*xs):
    return [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in xs]


def _dev(xs, kdev):
    return [x.to(kdev) if isinstance(x, torch.Tensor) else x for x in xs]


def test_reference_matches_transformers(gen, seed):
    x, w, _, pool = _f64(*_inputs(gen, 20, torch.float64))
    got_pool = pool.clone()
    y = reference_causal_conv1d(x, w, None, got_pool, _qsl([17, 3]), torch.tensor([2, 5]), torch.tensor([False, True]))
    # A new sequence: transformers' causal_conv1d_fn over the prompt (zero history).
    want = hf.causal_conv1d_fn(x[:17].t()[None], w, None, activation="silu")[0].t()
    torch.testing.assert_close(y[:17], want, rtol=1e-12, atol=1e-12, msg=f"seed={seed}")
    # A continued one, token by token through causal_conv1d_update, whose state keeps W columns (oldest unread).
    state = torch.cat([torch.zeros(C, 1, dtype=torch.float64), pool[5].t()], dim=1)[None].clone()
    for t in range(17, 20):
        want = hf.causal_conv1d_update(x[t: t + 1].t()[None], state, w, None, "silu")[0, :, 0]
        torch.testing.assert_close(y[t], want, rtol=1e-12, atol=1e-12, msg=f"token {t} (seed={seed})")
    torch.testing.assert_close(got_pool[5], state[0, :, 1:].t(), rtol=0, atol=0)
    torch.testing.assert_close(got_pool[2], x[14:17], rtol=0, atol=0)  # the prompt's last R inputs


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_triton_prefill_and_update_match_float64_reference(gen, kdev, check, dtype, bias, seed):
    from moelink.kernels.triton_causal_conv1d import triton_causal_conv1d, triton_causal_conv1d_update

    x, w, b, pool = _inputs(gen, sum(LENS), dtype, bias)
    slots = torch.tensor([3, -1, 5, 1, 6], dtype=torch.int32)  # the second a padding row
    has_init = torch.tensor([True, True, False, True, True])
    qsl = _qsl(LENS)
    for name in ("prefill", "update"):
        want_pool, got_pool = pool.double(), pool.clone().to(kdev)
        if name == "prefill":
            want = reference_causal_conv1d(*_f64(x, w, b), want_pool, qsl, slots, has_init)
            got = triton_causal_conv1d(*_dev((x, w, b), kdev), got_pool, *_dev((qsl, slots, has_init), kdev))
        else:  # every sequence continues from its slot (a verify-sized batch)
            want = reference_causal_conv1d_update(*_f64(x, w, b), want_pool, qsl, slots)
            got = triton_causal_conv1d_update(*_dev((x, w, b), kdev), got_pool, *_dev((qsl, slots), kdev))
        check(got, want, dtype, f"{name} y")
        # Written states are inputs copied (a state row shorter sequences keep is moved): exact.
        assert torch.equal(got_pool.cpu(), want_pool.to(dtype)), f"{name} pool (seed={seed})"


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefill_split_anywhere_and_decodes_after_it_equal_one_pass(gen, kdev, backend, seed):
    if backend == "triton":
        from moelink.kernels.triton_causal_conv1d import triton_causal_conv1d as conv
        from moelink.kernels.triton_causal_conv1d import triton_causal_conv1d_update as update
    else:
        conv, update = reference_causal_conv1d, reference_causal_conv1d_update
    L = 21
    x, w, _, pool = _dev(_inputs(gen, L, torch.float32), kdev)
    slot = torch.tensor([4], dtype=torch.int32, device=kdev)
    new, cont = torch.tensor([False], device=kdev), torch.tensor([True], device=kdev)
    one_pool = pool.clone()
    y_one = conv(x, w, None, one_pool, _qsl([L]).to(kdev), slot, new)
    split_pool, outs, a = pool.clone(), [], 0
    for i, n in enumerate([9, 1, 2, 9]):  # chunks shorter than the state too
        outs.append(conv(x[a: a + n], w, None, split_pool, _qsl([n]).to(kdev), slot, new if i == 0 else cont))
        a += n
    torch.testing.assert_close(torch.cat(outs), y_one, rtol=1e-6, atol=1e-6, msg=f"seed={seed}")
    assert torch.equal(split_pool, one_pool)
    dec_pool = pool.clone()
    outs = [conv(x[:18], w, None, dec_pool, _qsl([18]).to(kdev), slot, new)]
    pad = torch.tensor([4, -1], dtype=torch.int32, device=kdev)
    for t in range(18, L):  # one token each, beside a padding row
        two = torch.cat([x[t: t + 1], x[t: t + 1]])
        outs.append(update(two, w, None, dec_pool, torch.tensor([0, 1, 2], dtype=torch.int32, device=kdev), pad)[:1])
    torch.testing.assert_close(torch.cat(outs), y_one, rtol=1e-6, atol=1e-6, msg=f"seed={seed}")
    assert torch.equal(dec_pool, one_pool)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_verify_keeps_intermediate_states_and_commit_rolls_back(gen, kdev, backend, seed):
    if backend == "triton":
        from moelink.kernels.triton_causal_conv1d import triton_causal_conv1d_update as update
        from moelink.kernels.triton_causal_conv1d import triton_replay_conv_state as replay
        from moelink.kernels.triton_gated_delta import triton_commit_states as commit
    else:
        update, commit, replay = reference_causal_conv1d_update, reference_commit_states, reference_replay_conv_state
    lens, Q = [4, 3, 1], 4
    x, w, b, pool = _dev(_inputs(gen, sum(lens), torch.float32, bias=True), kdev)
    slots = torch.tensor([6, 1, 4], dtype=torch.int32, device=kdev)
    qsl = _qsl(lens).to(kdev)
    inter = torch.full((3, Q, W - 1, C), float("nan"), device=kdev)
    got_pool = pool.clone()
    y = update(x, w, b, got_pool, qsl, slots, "silu", inter)
    assert torch.equal(got_pool, pool), f"a verify step must not write the pool (seed={seed})"
    want_pool = pool.clone()
    torch.testing.assert_close(y, reference_causal_conv1d_update(x, w, b, want_pool, qsl, slots), rtol=1e-6, atol=1e-6)
    for s, n in enumerate(lens):
        a = int(qsl[s])
        history = torch.cat([pool[int(slots[s])], x[a: a + n]])  # the state after token j: rows j + 1 .. j + R
        for j in range(Q):
            if j < n:
                assert torch.equal(inter[s, j], history[j + 1: j + W]), f"state {j} of sequence {s} (seed={seed})"
            else:
                assert inter[s, j].isnan().all()
    accepted = torch.tensor([2, 3, 0], dtype=torch.int32, device=kdev)
    commit(got_pool, slots, inter, accepted)
    for s, n in enumerate(accepted.tolist()):
        slot = int(slots[s])
        assert torch.equal(got_pool[slot], pool[slot] if n == 0 else inter[s, n - 1]), f"slot {slot} (seed={seed})"
    replay_pool = pool.clone()  # without buffers: Q = 0 keeps nothing and writes nothing, then the accepted re-run
    assert torch.equal(update(x, w, b, replay_pool, qsl, slots, "silu", inter[:, :0]), y)
    assert torch.equal(replay_pool, pool)
    replay(x, replay_pool, qsl, slots, accepted)
    assert torch.equal(replay_pool, got_pool), f"replay vs commit (seed={seed})"


def test_bad_inputs_are_named(gen, kdev):
    from moelink.kernels.triton_causal_conv1d import triton_causal_conv1d

    x, w, _, pool = _inputs(gen, 3, torch.float32)
    qsl, slot = _qsl([3]), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"conv_state_pool_PRC \(8, 4, 40\) must be \[P, R=3, C=40\]"):
        reference_causal_conv1d(x, w, None, torch.zeros(8, 4, C), qsl, slot)
    with pytest.raises(ValueError, match="activation='gelu' is invalid"):
        reference_causal_conv1d(x, w, None, pool, qsl, slot, activation="gelu")
    with pytest.raises(ValueError, match="of x_TC's dtype"):
        triton_causal_conv1d(*_dev((x, w, None, pool.bfloat16(), qsl, slot), kdev))
