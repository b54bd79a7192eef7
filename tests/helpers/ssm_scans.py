"""The checks Mamba1's and Mamba2's scans (tests/kernels/test_mamba1.py, test_mamba2.py) both pass, whatever their
state's shape: both kernels take (x, dt, B, C, A_log, D, dt_bias) — the first four per token, the rest per channel or
head — then a state pool [P, ...], query starts and slots, and share the scan / decode / replay protocol of
kernels/gated_delta.py. `xs` below is that list of seven tensors, `pool` the [P, ...] state pool.
"""
from __future__ import annotations

import torch


def qsl(lens) -> torch.Tensor:
    """query_start_loc_S1 of sequences of `lens` tokens."""
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)


def as_f64(xs):
    return [x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in xs]


def on_device(xs, kdev):
    return [x.to(kdev) if isinstance(x, torch.Tensor) else x for x in xs]


def check_split_prefill_and_decodes(scan, decode, xs, pool, kdev, seed) -> None:
    """A 21-token prompt in one pass equals it split 9 + 1 + 2 + 9 (each chunk continuing the state) and 18 tokens
    then one-token decodes beside a padding row, outputs and final state; the padding row writes nothing."""
    L, P = xs[0].shape[0], pool.shape[0]
    slot = torch.tensor([4], dtype=torch.int32, device=kdev)
    new, cont = torch.tensor([False], device=kdev), torch.tensor([True], device=kdev)
    one_pool = pool.clone()
    y_one = scan(*xs, one_pool, qsl([L]).to(kdev), slot, new)
    split_pool, outs, a = pool.clone(), [], 0
    for i, n in enumerate([9, 1, 2, L - 12]):
        outs.append(scan(*[t[a: a + n] for t in xs[:4]], *xs[4:], split_pool, qsl([n]).to(kdev), slot,
                         new if i == 0 else cont))
        a += n
    torch.testing.assert_close(torch.cat(outs), y_one, rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(split_pool, one_pool, rtol=1e-5, atol=1e-5)
    dec_pool = pool.clone()
    outs = [scan(*[t[:L - 3] for t in xs[:4]], *xs[4:], dec_pool, qsl([L - 3]).to(kdev), slot, new)]
    pad = torch.tensor([4, -1], dtype=torch.int32, device=kdev)
    for t in range(L - 3, L):  # one token each, beside a padding row
        two = [torch.cat([v[t: t + 1], v[t: t + 1]]) for v in xs[:4]]
        outs.append(decode(*two, *xs[4:], dec_pool, torch.tensor([0, 1, 2], dtype=torch.int32, device=kdev),
                           pad)[:1])
    torch.testing.assert_close(torch.cat(outs), y_one, rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(dec_pool, one_pool, rtol=1e-5, atol=1e-5)
    assert torch.equal(dec_pool[torch.arange(P) != 4], pool[torch.arange(P) != 4])  # the padding row wrote nothing


def check_verify_then_replay(decode, replay, xs, pool, kdev, seed) -> None:
    """A verify step of 4 tokens for each of 3 sequences (xs: 12 tokens) reads the states and writes none, its
    outputs those of plain decoding; the replay of 0, 2 and 4 accepted tokens leaves each slot where plain decoding
    of those tokens leaves it."""
    slots = torch.tensor([5, 0, 2], dtype=torch.int32, device=kdev)
    q = qsl([4, 4, 4]).to(kdev)
    kept = pool.clone()
    y = decode(*xs, kept, q, slots, update_state=False)
    assert torch.equal(kept, pool)
    plain = pool.clone()
    torch.testing.assert_close(y, decode(*xs, plain, q, slots), rtol=1e-6, atol=1e-6)
    replay(*xs, kept, q, slots, torch.tensor([0, 2, 4], dtype=torch.int32, device=kdev))
    want = pool.clone()
    for s, n in enumerate([0, 2, 4]):
        rows = slice(4 * s, 4 * s + n)
        decode(*[t[rows] for t in xs[:4]], *xs[4:], want, qsl([n]).to(kdev), slots[s: s + 1])
    torch.testing.assert_close(kept, want, rtol=1e-6, atol=1e-6, msg=f"seed={seed}")


def check_triton_against_f64(reference, triton, xs, pool, lens, kdev, check, dtype, **kw) -> None:
    """The Triton (scan, decode) on `kdev` against the reference (scan, decode) in float64, outputs and pools, on
    the ragged batch of `lens` (the second a padding row, the third a new sequence); kw: the kernels' extra
    arguments (Mamba2's dt clamp)."""
    slots = torch.tensor([3, -1, 5, 1, 6], dtype=torch.int32)  # the second a padding row
    has_init = torch.tensor([True, True, False, True, True])
    q = qsl(lens)
    for name in ("prefill", "decode"):
        want_pool, got_pool = pool.double(), pool.clone().to(kdev)
        if name == "prefill":
            want = reference[0](*as_f64(xs), want_pool, q, slots, has_init, **kw)
            got = triton[0](*on_device(xs, kdev), got_pool, *on_device((q, slots, has_init), kdev), **kw)
        else:  # every sequence continues from its slot (a verify-sized batch)
            want = reference[1](*as_f64(xs), want_pool, q, slots, **kw)
            got = triton[1](*on_device(xs, kdev), got_pool, *on_device((q, slots), kdev), **kw)
        check(got, want, dtype, f"{name} y")
        check(got_pool, want_pool, torch.float32 if dtype == torch.float32 else dtype, f"{name} pool")
