"""Mamba2's SSM scan (kernels/mamba2.py, kernels/triton_mamba2.py): the reference against transformers' own torch
functions (the oracle: mamba2_chunk_scan / mamba2_selective_state_update, as GraniteMoeHybridMambaLayer calls them),
its chunked form against the token-by-token recurrence in float64, a prefill split anywhere and decodes after it
against one pass, a verify step (states read, not written) and its replay against plain decoding, and the Triton
kernel against the float64 reference on ragged batches (slots, new sequences, a padding row, a prompt past one
block, a time_step_limit clamp) under the interpreter."""
from __future__ import annotations

import math

import pytest
import torch
from transformers.models.granitemoehybrid import modeling_granitemoehybrid as hf

from moelink.kernels.mamba2 import (reference_mamba2_decode, reference_mamba2_recurrence, reference_mamba2_replay,
                                    reference_mamba2_scan)

from tests.helpers.ssm_scans import (check_split_prefill_and_decodes, check_triton_against_f64,
                                     check_verify_then_replay, on_device as _dev, qsl as _qsl)

N, H, G, K, P = 4, 8, 2, 16, 8  # 4 heads of 8 (two per group), state 16: Granite 4.0-H's shape in miniature
LENS = [1, 3, 17, 0, 130]  # a decode, a draft-sized run, a short prompt, an empty one, a prompt past two 64-blocks


def _inputs(gen, T, dtype=torch.float64):
    """x, B, C as the convolved x|B|C (strided views of one [T, N H + 2 G K] tensor), raw dt, the per-head weights."""
    xbc = torch.randn(T, N * H + 2 * G * K, generator=gen)
    x = xbc[:, :N * H].view(T, N, H)
    B = xbc[:, N * H: N * H + G * K].view(T, G, K)
    C = xbc[:, N * H + G * K:].view(T, G, K)
    dt = torch.randn(T, N, generator=gen) - 1.0
    A_log = torch.rand(N, generator=gen).log1p()  # A in [-2, -1]: decays over tens of tokens
    D, dt_bias = torch.randn(N, generator=gen), torch.randn(N, generator=gen) * 0.5
    return [t.to(dtype) for t in (x, dt, B, C, A_log, D, dt_bias)]


def _pool(gen, dtype=torch.float64):
    return (0.3 * torch.randn(P, N, H, K, generator=gen)).to(dtype)


@pytest.mark.parametrize("with_state", [False, True], ids=["new", "continued"])
def test_reference_matches_transformers_chunked_and_recurrent(gen, with_state, seed):
    lens = [70, 5]
    x, dt, B, C, A_log, D, dt_bias = _inputs(gen, sum(lens))
    pool = _pool(gen)
    slots = torch.tensor([6, 2], dtype=torch.int32)
    got_pool = pool.clone()
    y = reference_mamba2_scan(x, dt, B, C, A_log, D, dt_bias, got_pool, _qsl(lens), slots,
                              torch.full((2,), with_state))
    A = -torch.exp(A_log.float())
    # The 70-token prompt: transformers' chunked scan (chunk 16, float32 inside: float32's rounding).
    init = pool[6][None].clone() if with_state else None
    want, want_state = hf.mamba2_chunk_scan(x[None, :70], dt[None, :70], A, B[None, :70], C[None, :70], chunk_size=16,
                                            D=D, dt_bias=dt_bias, initial_states=init, dt_softplus=True,
                                            return_final_states=True)
    torch.testing.assert_close(y[:70], want[0].double(), rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(got_pool[6], want_state[0].double(), rtol=1e-5, atol=1e-5)
    # The 5-token one, token by token through the decode step (its state in float64 as the cache holds it).
    state = (pool[2] if with_state else torch.zeros_like(pool[2]))[None].clone()
    for t in range(70, 75):
        w = hf.mamba2_selective_state_update(
            state, x[t][None], dt[t][None, :, None].expand(-1, -1, H), A[:, None, None].expand(-1, H, K),
            B[t][None], C[t][None], D[:, None].expand(-1, H), dt_bias=dt_bias[:, None].expand(-1, H),
            dt_softplus=True)
        torch.testing.assert_close(y[t], w[0], rtol=1e-6, atol=1e-6, msg=f"token {t} (seed={seed})")
    torch.testing.assert_close(got_pool[2], state[0], rtol=1e-6, atol=1e-6)


def test_chunked_form_equals_the_recurrence_in_float64(gen, seed):
    """Every sequence of a ragged batch (an empty one, a padding row, one past two blocks) against the recurrence,
    with and without a starting state; the padding row's slot is not written."""
    lens = [130, 2, 0, 5, 69]
    xs = _inputs(gen, sum(lens))
    pool = _pool(gen)
    slots = torch.tensor([1, 4, 2, -1, 7], dtype=torch.int32)
    has_init = torch.tensor([True, False, True, True, False])
    got = pool.clone()
    y = reference_mamba2_scan(*xs, got, _qsl(lens), slots, has_init)
    qsl = _qsl(lens).tolist()
    for s, slot in enumerate(slots.tolist()):
        rows = slice(qsl[s], qsl[s + 1])
        h0 = pool[slot] if slot >= 0 and has_init[s] else torch.zeros_like(pool[0])
        want, h = reference_mamba2_recurrence(*[t[rows] for t in xs[:4]], *xs[4:], h0)
        torch.testing.assert_close(y[rows], want, rtol=1e-11, atol=1e-11, msg=f"seq {s} (seed={seed})")
        if slot >= 0:
            torch.testing.assert_close(got[slot], h, rtol=1e-11, atol=1e-11)
    assert torch.equal(got[[0, 3, 5, 6]], pool[[0, 3, 5, 6]])  # slots nobody owns: untouched


def test_time_step_limit_clamps_dt(gen, seed):
    xs = _inputs(gen, 9)
    pool = _pool(gen)
    got = pool.clone()
    y = reference_mamba2_scan(*xs, got, _qsl([9]), torch.tensor([3], dtype=torch.int32), torch.tensor([False]),
                              dt_min=0.05, dt_max=0.2)
    want, h = reference_mamba2_recurrence(*xs, torch.zeros_like(pool[0]), dt_min=0.05, dt_max=0.2)
    torch.testing.assert_close(y, want, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got[3], h, rtol=1e-11, atol=1e-11)
    assert not torch.allclose(y, reference_mamba2_recurrence(*xs, torch.zeros_like(pool[0]))[0])


def _backend(name):
    if name == "triton":
        from moelink.kernels.triton_mamba2 import triton_mamba2_decode, triton_mamba2_replay, triton_mamba2_scan

        return triton_mamba2_scan, triton_mamba2_decode, triton_mamba2_replay
    return reference_mamba2_scan, reference_mamba2_decode, reference_mamba2_replay


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_prefill_split_anywhere_and_decodes_after_it_equal_one_pass(gen, kdev, backend, seed):
    scan, decode, _ = _backend(backend)
    xs = _dev(_inputs(gen, 21, torch.float32), kdev)
    check_split_prefill_and_decodes(scan, decode, xs, _pool(gen, torch.float32).to(kdev), kdev, seed)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_verify_leaves_states_and_replay_takes_the_accepted_tokens(gen, kdev, backend, seed):
    """A verify step of 4 tokens per sequence reads the states and writes none; the replay of 0, 2 and 4 accepted
    tokens leaves each slot where plain decoding of those tokens leaves it."""
    _, decode, replay = _backend(backend)
    xs = _dev(_inputs(gen, 12, torch.float32), kdev)
    check_verify_then_replay(decode, replay, xs, _pool(gen, torch.float32).to(kdev), kdev, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_triton_scan_and_decode_match_float64_reference(gen, kdev, check, dtype, seed):
    from moelink.kernels.triton_mamba2 import triton_mamba2_decode, triton_mamba2_scan

    lens = [1, 3, 17, 0, 70]
    check_triton_against_f64((reference_mamba2_scan, reference_mamba2_decode),
                             (triton_mamba2_scan, triton_mamba2_decode), _inputs(gen, sum(lens), dtype),
                             _pool(gen, torch.float32), lens, kdev, check, dtype, dt_min=0.01, dt_max=0.8)


def test_bad_inputs_are_named(gen):
    xs = _inputs(gen, 4)
    pool = _pool(gen)
    qsl, slots = _qsl([4]), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"dt_TN \(4, 3\) must be \[T=4, N=4\]"):
        reference_mamba2_scan(xs[0], xs[1][:, :3], *xs[2:], pool, qsl, slots)
    with pytest.raises(ValueError, match=r"B_TGK .* with G dividing N=4"):
        reference_mamba2_scan(*xs[:2], xs[2][:, :1].expand(4, 3, K), xs[3][:, :1].expand(4, 3, K), *xs[4:], pool, qsl,
                              slots)
    with pytest.raises(ValueError, match=r"state_pool_PNHK \(8, 4, 8, 15\) must be \[P, N=4, H=8, K=16\]"):
        reference_mamba2_scan(*xs, pool[..., :15], qsl, slots)
    assert math.isinf(reference_mamba2_scan.__defaults__[-1])
