"""Gated DeltaNet kernels at Qwen3-Next-80B-A3B's shapes on a GPU (`pytest -m gpu`; skipped without CUDA):
16 q/k heads, 32 value heads, head dims 128, conv kernel 4 over 2 * 16 * 128 + 32 * 128 = 8192 channels. Oracles
are the float32 references on the same device; the decode-path kernels also run under torch.cuda sync-debug mode
"error" (CUDA graphs need them free of host syncs). fla's prefill runs where fla-core is installed."""
from __future__ import annotations

import os

import pytest
import torch

from moelink.kernels.causal_conv1d import reference_causal_conv1d, reference_causal_conv1d_update
from moelink.kernels.gated_delta import reference_gated_delta_rule, reference_gated_delta_rule_decode

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

G, N, K, V, W = 16, 32, 128, 128, 4
C = 2 * G * K + N * V
DEV = "cuda"


def _rel(got, want):
    return float((got.float() - want.float()).norm() / want.float().norm())


def _qsl(lens):
    return torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=DEV)


def _gdn_inputs(T, dtype=torch.bfloat16):
    x = torch.randn(T, C, device=DEV).to(dtype)
    q, k = x[:, : G * K].view(T, G, K), x[:, G * K: 2 * G * K].view(T, G, K)
    v = x[:, 2 * G * K:].view(T, N, V)
    g = -torch.nn.functional.softplus(torch.randn(T, N, device=DEV)) * 0.3
    beta = torch.rand(T, N, device=DEV).to(dtype)
    return q, k, v, g, beta


def test_decode_with_intermediates_at_model_shape_has_no_host_sync():
    from moelink.kernels.triton_gated_delta import triton_commit_states, triton_gated_delta_rule_decode

    S, Q = 64, 4
    lens = [Q] * S
    q, k, v, g, beta = _gdn_inputs(S * Q)
    pool = 0.1 * torch.randn(2 * S, N, K, V, device=DEV)
    slots = torch.randperm(2 * S, device=DEV)[:S].to(torch.int32)
    qsl = _qsl(lens)
    inter = torch.empty(S, Q, N, K, V, device=DEV)
    got_pool = pool.clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = triton_gated_delta_rule_decode(q, k, v, g, beta, got_pool, qsl, slots, inter)
        triton_commit_states(got_pool, slots, inter, torch.full((S,), 2, dtype=torch.int32, device=DEV))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want_pool = pool.clone()
    want = reference_gated_delta_rule_decode(q.float(), k.float(), v.float(), g, beta.float(), want_pool, qsl, slots)
    assert _rel(o, want) < 1e-2
    two = [x.view(S, Q, *x.shape[1:])[:, :2].reshape(2 * S, *x.shape[1:]) for x in (q, k, v, g, beta)]
    ref_pool = pool.clone()
    reference_gated_delta_rule_decode(*[x.float() for x in two], ref_pool, _qsl([2] * S), slots)
    assert _rel(got_pool, ref_pool) < 1e-4


@pytest.mark.parametrize("path", ["triton", "fla"])
def test_prefill_at_model_shape(path):
    from moelink.kernels.fla_gated_delta import FlaGatedDeltaRule, fla_available
    from moelink.kernels.triton_gated_delta import triton_gated_delta_rule

    if path == "fla" and not fla_available():
        pytest.skip("fla-core is not installed")
    rule = FlaGatedDeltaRule(fallback_fn=triton_gated_delta_rule) if path == "fla" else triton_gated_delta_rule
    lens = [1, 700, 2049]
    q, k, v, g, beta = _gdn_inputs(sum(lens))
    pool = 0.1 * torch.randn(4, N, K, V, device=DEV)
    slots = torch.tensor([2, 0, 3], dtype=torch.int32, device=DEV)
    has_init = torch.tensor([True, False, True], device=DEV)
    got_pool, want_pool = pool.clone(), pool.clone()
    o = rule(q, k, v, g, beta, got_pool, _qsl(lens), slots, has_init)
    want = reference_gated_delta_rule(q.float(), k.float(), v.float(), g, beta.float(), want_pool, _qsl(lens), slots,
                                      has_init)
    assert _rel(o, want) < 1e-2
    assert _rel(got_pool, want_pool) < 1e-2


def test_conv_prefill_and_update_at_model_shape():
    from moelink.kernels.triton_causal_conv1d import triton_causal_conv1d, triton_causal_conv1d_update

    lens = [1, 300, 4097]
    x = torch.randn(sum(lens), C, device=DEV).bfloat16()
    w = (torch.randn(C, W, device=DEV) / 2).bfloat16()
    pool = torch.randn(4, W - 1, C, device=DEV).bfloat16()
    slots = torch.tensor([3, 1, 0], dtype=torch.int32, device=DEV)
    has_init = torch.tensor([True, False, True], device=DEV)
    got_pool, want_pool = pool.clone(), pool.float()
    y = triton_causal_conv1d(x, w, None, got_pool, _qsl(lens), slots, has_init)
    want = reference_causal_conv1d(x.float(), w.float(), None, want_pool, _qsl(lens), slots, has_init)
    assert _rel(y, want) < 1e-2 and torch.equal(got_pool.float(), want_pool)
    xs, qsl = x[:3], _qsl([1, 1, 1])  # three decodes
    got_pool, want_pool = pool.clone(), pool.float()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y = triton_causal_conv1d_update(xs, w, None, got_pool, qsl, slots)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = reference_causal_conv1d_update(xs.float(), w.float(), None, want_pool, qsl, slots)
    assert _rel(y, want) < 1e-2 and torch.equal(got_pool.float(), want_pool)
