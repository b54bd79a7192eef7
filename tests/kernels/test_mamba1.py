"""Mamba1's selective scan (kernels/mamba1.py, kernels/triton_mamba1.py): the reference against transformers' own
torch functions (the oracle: JambaMambaMixer's mamba_selective_scan / mamba_selective_state_update), against a
float64 token-by-token recurrence written out as transformers' slow path writes it, a prefill split anywhere and
decodes after it against one pass, a verify step (states read, not written) and its replay against plain decoding,
and the Triton kernel against the float64 reference on ragged batches (slots, new sequences, a padding row, channels
past one block) under the interpreter."""
from __future__ import annotations

import pytest
import torch
from transformers.models.jamba import modeling_jamba as hf

from moelink.kernels.mamba1 import (reference_mamba1_decode, reference_mamba1_recurrence, reference_mamba1_replay,
                                    reference_mamba1_scan)

from tests.helpers.ssm_scans import (check_split_prefill_and_decodes, check_triton_against_f64,
                                     check_verify_then_replay, on_device as _dev, qsl as _qsl)

I, K, P = 40, 16, 8  # 40 channels (not a power of two: the kernel's last block is partial), d_state 16
LENS = [1, 3, 17, 0, 70]


def _inputs(gen, T, dtype=torch.float64):
    """x (the convolved channels), raw dt (dt_proj's matmul), B, C (strided views of one x_proj-like output), and
    the per-channel weights: A_log [I, K] as Jamba initialises it (log 1..K) plus noise, D, dt_bias."""
    x = torch.randn(T, I, generator=gen)
    bc = torch.randn(T, 3 + 2 * K, generator=gen)
    B, C = bc[:, 3:3 + K], bc[:, 3 + K:]
    dt = torch.randn(T, I, generator=gen) - 1.0
    A_log = torch.arange(1, K + 1, dtype=torch.float64).log()[None].expand(I, K) + 0.3 * torch.randn(I, K, generator=gen)
    D, dt_bias = torch.randn(I, generator=gen), torch.randn(I, generator=gen) * 0.5
    return [t.to(dtype) for t in (x, dt, B, C, A_log, D, dt_bias)]


def _pool(gen, dtype=torch.float64):
    return (0.3 * torch.randn(P, I, K, generator=gen)).to(dtype)


def test_reference_matches_transformers_scan_and_state_update(gen, seed):
    """A 70-token prompt from a zero state through transformers' sequence form, then 5 tokens through its
    single-token update (float32 inside: float32's rounding)."""
    x, dt, B, C, A_log, D, dt_bias = _inputs(gen, 75)
    pool = torch.zeros(P, I, K, dtype=torch.float64)
    slots = torch.tensor([6], dtype=torch.int32)
    y = reference_mamba1_scan(x[:70], dt[:70], B[:70], C[:70], A_log, D, dt_bias, pool, _qsl([70]), slots,
                              torch.tensor([False]))
    A = -torch.exp(A_log.float())
    want, state = hf.mamba_selective_scan(x[None, :70].mT, dt[None, :70].mT, A, B[None, :70].mT, C[None, :70].mT,
                                          D=D.float(), delta_bias=dt_bias.float(), delta_softplus=True,
                                          return_last_state=True, use_associative_scan=False)
    torch.testing.assert_close(y, want[0].mT.double(), rtol=1e-5, atol=1e-5, msg=f"seed={seed}")
    torch.testing.assert_close(pool[6], state[0].double(), rtol=1e-5, atol=1e-5)
    state = state.clone()
    for t in range(70, 75):
        w = hf.mamba_selective_state_update(state, x[t][None], dt[t][None], A, B[t][None], C[t][None], D,
                                            dt_bias=dt_bias, dt_softplus=True)
        got = reference_mamba1_decode(x[t:t + 1], dt[t:t + 1], B[t:t + 1], C[t:t + 1], A_log, D, dt_bias, pool,
                                      _qsl([1]), slots)
        torch.testing.assert_close(got[0], w[0], rtol=1e-5, atol=1e-5, msg=f"token {t} (seed={seed})")
    torch.testing.assert_close(pool[6], state[0], rtol=1e-5, atol=1e-5)


def test_reference_equals_the_float64_recurrence(gen, seed):
    """Every sequence of a ragged batch (an empty one, a padding row) against the recurrence, with and without a
    starting state; the padding row's slot and slots nobody owns are not written."""
    lens = [130, 2, 0, 5, 69]
    xs = _inputs(gen, sum(lens))
    pool = _pool(gen)
    slots = torch.tensor([1, 4, 2, -1, 7], dtype=torch.int32)
    has_init = torch.tensor([True, False, True, True, False])
    got = pool.clone()
    y = reference_mamba1_scan(*xs, got, _qsl(lens), slots, has_init)
    qsl = _qsl(lens).tolist()
    for s, slot in enumerate(slots.tolist()):
        rows = slice(qsl[s], qsl[s + 1])
        h0 = pool[slot] if slot >= 0 and has_init[s] else torch.zeros_like(pool[0])
        want, h = reference_mamba1_recurrence(*[t[rows] for t in xs[:4]], *xs[4:], h0)
        torch.testing.assert_close(y[rows], want, rtol=1e-12, atol=1e-12, msg=f"seq {s} (seed={seed})")
        if slot >= 0:
            torch.testing.assert_close(got[slot], h, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[[0, 3, 5, 6]], pool[[0, 3, 5, 6]])


def _backend(name):
    if name == "triton":
        from moelink.kernels.triton_mamba1 import triton_mamba1_decode, triton_mamba1_replay, triton_mamba1_scan

        return triton_mamba1_scan, triton_mamba1_decode, triton_mamba1_replay
    return reference_mamba1_scan, reference_mamba1_decode, reference_mamba1_replay


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
    from moelink.kernels.triton_mamba1 import triton_mamba1_decode, triton_mamba1_scan

    check_triton_against_f64((reference_mamba1_scan, reference_mamba1_decode),
                             (triton_mamba1_scan, triton_mamba1_decode), _inputs(gen, sum(LENS), dtype),
                             _pool(gen, torch.float32), LENS, kdev, check, dtype)


def test_bad_inputs_are_named(gen):
    xs = _inputs(gen, 4)
    pool = _pool(gen)
    qsl, slots = _qsl([4]), torch.tensor([0], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"dt_TI \(4, 3\) must be \[T=4, I=40\]"):
        reference_mamba1_scan(xs[0], xs[1][:, :3], *xs[2:], pool, qsl, slots)
    with pytest.raises(ValueError, match=r"A_log_IK \(40, 15\) must be \[I=40, K=16\]"):
        reference_mamba1_scan(*xs[:4], xs[4][:, :15], *xs[5:], pool, qsl, slots)
    with pytest.raises(ValueError, match=r"state_pool_PIK \(8, 40, 15\) must be \[P, I=40, K=16\]"):
        reference_mamba1_scan(*xs, pool[..., :15], qsl, slots)
    with pytest.raises(ValueError, match=r"num_accepted_S \(2,\) must be \[S=1\]"):
        reference_mamba1_replay(*xs, pool, qsl, slots, torch.tensor([1, 1]))
