"""The decode attention input in one launch (kernels/triton_qkv_rope_kv.py: residual add + input norm, the q/k/v
GEMV, q/k norm + rotary + KV write) against its reference (kernels/attention_input.py), a float64 oracle, the
unfused Triton kernels it replaces, and its own properties: counters left zero, batch invariance."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.attention_input import reference_norm_qkv_rope_kv
from moelink.kernels.rotary import rotary_cos_sin_cache
from moelink.kernels.triton_norm import triton_add_rms_norm
from moelink.kernels.attention_input import MAX_TOKENS, fused
from moelink.kernels.triton_qkv_rope_kv import group_counters, triton_norm_qkv_rope_kv
from moelink.kernels.triton_rope_kv import triton_rope_write_kv

BLOCK = 4
# (T, D, N, K, H, Hv, R, qk_norm, residual, bias): Qwen3-like (qk norm, full rotary, a residual), the first layer
# (no residual yet), GLM-like partial rotary with a qkv bias, values narrower than keys (MiMo), MQA at the largest
# fused batch, a D that is no multiple of the K tile.
CASES = [(1, 64, 4, 2, 16, 16, 16, True, True, False), (3, 96, 3, 1, 32, 32, 16, True, False, True),
         (2, 80, 2, 2, 32, 16, 32, False, True, False), (MAX_TOKENS, 72, 6, 1, 16, 16, 8, True, True, True)]


def _inputs(gen, T, D, N, K, H, Hv, R, qk_norm, residual, bias, dtype, cache_dtype=None):
    x = torch.randn(T, D, generator=gen).to(dtype)
    res = torch.randn(T, D, generator=gen).to(dtype) if residual else None
    norm = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype)
    rows = N * H + K * (H + Hv)
    w = (torch.randn(rows, D, generator=gen) / D ** 0.5).to(dtype)
    b = (0.1 * torch.randn(rows, generator=gen)).to(dtype) if bias else None
    qk = [(1 + 0.1 * torch.randn(H, generator=gen)).to(dtype) for _ in range(2)] if qk_norm else [None, None]
    table = rotary_cos_sin_cache(R, 4096, 1e6)
    pos = torch.randint(0, 4096, (T,), generator=gen)
    caches = [torch.zeros(T + 2, BLOCK, K, h, dtype=cache_dtype or dtype) for h in (H, Hv)]
    slots = torch.randperm(T + 1, generator=gen)[:T] * BLOCK + torch.randint(0, BLOCK, (T,), generator=gen)
    if T > 2:
        slots[1] = -1  # a padding token: writes nothing
    return dict(x=x, res=res, norm=norm, w=w, b=b, qk=qk, table=table, pos=pos, caches=caches, slots=slots)


def _run(op, a, N, K, Hv, kdev, caches, **kw):
    d = {k: (v.to(kdev) if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    qk = [w.to(kdev) if w is not None else None for w in a["qk"]]
    return op(d["x"], d["res"], d["norm"], 1e-6, d["w"], d["b"], N, K, Hv, d["pos"], d["table"], *caches,
              d["slots"], *qk, 1e-6, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,D,N,K,H,Hv,R,qk_norm,residual,bias", CASES)
def test_fused_input_matches_reference_and_oracle(T, D, N, K, H, Hv, R, qk_norm, residual, bias, dtype, gen, kdev,
                                                  check, seed):
    a = _inputs(gen, T, D, N, K, H, Hv, R, qk_norm, residual, bias, dtype)
    assert fused(T, H, Hv)
    counters = group_counters(N, K, kdev)
    got_caches = [c.clone().to(kdev) for c in a["caches"]]
    got_q, got_sum = _run(triton_norm_qkv_rope_kv, a, N, K, Hv, kdev, got_caches, counters_G=counters)
    assert got_q.shape == (T, N, H) and got_q.is_contiguous()
    assert not counters.any(), f"the launch must leave its counters zero (seed={seed})"
    want_caches = [c.clone() for c in a["caches"]]
    want_q, want_sum = reference_norm_qkv_rope_kv(a["x"], a["res"], a["norm"], 1e-6, a["w"], a["b"], N, K, Hv,
                                                  a["pos"], a["table"], *want_caches, a["slots"], *a["qk"], 1e-6)
    # The residual sum is one rounded add: bit for bit.
    assert torch.equal(got_sum.cpu(), want_sum), f"x + residual (seed={seed})"
    # The GEMV sums in its own order: within the dtype's tolerance of torch, and of float64.
    check(got_q, want_q.double(), dtype, "q vs the reference")
    a64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "table" else v)
           for k, v in a.items()}
    a64["qk"] = [w.double() if w is not None else None for w in a["qk"]]
    want64_caches = [c.double() for c in a["caches"]]
    want64_q, _ = reference_norm_qkv_rope_kv(a64["x"], a64["res"], a64["norm"], 1e-6, a64["w"], a64["b"], N, K, Hv,
                                             a["pos"], a["table"], *want64_caches, a["slots"], *a64["qk"], 1e-6)
    check(got_q, want64_q, dtype, f"q {T, D, N, K, H, Hv, R}")
    for got, want in zip(got_caches, want64_caches):
        check(got, want, dtype, "cache")
    if T > 2:  # the padding token wrote nothing: T - 1 rows of each cache are set
        assert int((got_caches[0].cpu() != 0).any(-1).any(-1).sum()) == T - 1


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
def test_fused_input_normed_and_roped_as_the_unfused_kernels(cache_dtype, gen, kdev, seed):
    """With the projection taken out of the comparison (a one-hot weight: its GEMV is exact in any summation
    order), the norm and the epilogue are the unfused Triton kernels' bit for bit, an fp8 cache's scaled,
    saturated values too."""
    T, D, N, K, H = 3, 64, 2, 1, 16
    a = _inputs(gen, T, D, N, K, H, H, H, True, True, False, torch.bfloat16, cache_dtype)
    # v / 0.002 passes 448 for the normed inputs over ~0.9: saturation matters (fp8)
    scales = dict(k_scale=0.25, v_scale=0.002) if cache_dtype != torch.bfloat16 else {}
    rows = N * H + 2 * K * H
    a["w"] = torch.zeros(rows, D, dtype=torch.bfloat16)
    a["w"][torch.arange(rows), torch.randperm(D, generator=gen)[:rows]] = 1.0  # each row picks one input
    got_caches = [c.clone().to(kdev) for c in a["caches"]]
    got_q, _ = _run(triton_norm_qkv_rope_kv, a, N, K, H, kdev, got_caches, **scales)
    h, _ = triton_add_rms_norm(a["x"].to(kdev), a["res"].to(kdev), a["norm"].to(kdev), 1e-6)
    qkv = h @ a["w"].to(kdev).t()
    old_caches = [c.clone().to(kdev) for c in a["caches"]]
    want_q = triton_rope_write_kv(qkv[:, :N * H].view(T, N, H), qkv[:, N * H:(N + K) * H].view(T, K, H),
                                  qkv[:, (N + K) * H:].view(T, K, H), a["pos"].to(kdev), a["table"].to(kdev),
                                  *old_caches, a["slots"].to(kdev), *(w.to(kdev) for w in a["qk"]), 1e-6, **scales)
    assert torch.equal(got_q.cpu(), want_q.cpu()), f"q (seed={seed})"
    for g, o in zip(got_caches, old_caches):
        assert torch.equal(g.cpu().view(torch.uint8), o.cpu().view(torch.uint8)), f"caches (seed={seed})"
    if scales:
        assert got_caches[1].float().abs().max() == 448


def test_fused_input_is_batch_invariant_and_replays(gen, kdev, seed):
    """A token's q and cache rows are the same bits alone and in a batch of MAX_TOKENS (each program sums one
    token's rows in a fixed order), and a second launch on the same counters gives the same bits."""
    T, D, N, K, H = MAX_TOKENS, 96, 4, 2, 32
    a = _inputs(gen, T, D, N, K, H, H, H, True, True, False, torch.bfloat16)
    a["slots"] = torch.arange(T) * BLOCK  # every token writes
    counters = group_counters(N, K, kdev)
    caches = [c.clone().to(kdev) for c in a["caches"]]
    q_all, _ = _run(triton_norm_qkv_rope_kv, a, N, K, H, kdev, caches, counters_G=counters)
    again = [c.clone().to(kdev) for c in a["caches"]]
    q_again, _ = _run(triton_norm_qkv_rope_kv, a, N, K, H, kdev, again, counters_G=counters)
    assert torch.equal(q_all.cpu(), q_again.cpu()) and all(torch.equal(x, y) for x, y in zip(caches, again))
    for t in (0, T - 1):
        one = {k: (v[t:t + 1] if k in ("x", "res", "pos", "slots") else v) for k, v in a.items()}
        alone = [c.clone().to(kdev) for c in a["caches"]]
        q_one, _ = _run(triton_norm_qkv_rope_kv, one, N, K, H, kdev, alone, counters_G=counters)
        assert torch.equal(q_one.cpu()[0], q_all.cpu()[t]), f"token {t}: q depends on the batch (seed={seed})"
        s = int(a["slots"][t])
        for c_one, c_all in zip(alone, caches):
            assert torch.equal(c_one.flatten(0, 1)[s].cpu(), c_all.flatten(0, 1)[s].cpu()), f"token {t} (seed={seed})"


def test_past_the_fused_batch_the_op_runs_unfused(gen, kdev, check):
    """T > MAX_TOKENS (a prefill chunk), or heads no block divides, keep the op's contract (norm, linear and
    rope_write_kv apart)."""
    assert not fused(MAX_TOKENS + 1, 16, 16) and not fused(1, 12, 12)
    for T, H in ((MAX_TOKENS + 3, 16), (2, 12)):
        a = _inputs(gen, T, 48, 2, 1, H, H, H, True, True, False, torch.float32)
        got_caches = [c.clone().to(kdev) for c in a["caches"]]
        got_q, got_sum = _run(triton_norm_qkv_rope_kv, a, 2, 1, H, kdev, got_caches)
        want_caches = [c.clone() for c in a["caches"]]
        want_q, want_sum = reference_norm_qkv_rope_kv(a["x"], a["res"], a["norm"], 1e-6, a["w"], a["b"], 2, 1, H,
                                                      a["pos"], a["table"], *want_caches, a["slots"], *a["qk"], 1e-6)
        check(got_q, want_q.double(), torch.float32, f"unfused q, T={T} H={H}")
        assert torch.equal(got_sum.cpu(), want_sum)


def test_fused_input_rejects_bad_inputs(gen, kdev):
    a = _inputs(gen, 2, 64, 2, 1, 16, 16, 16, True, True, False, torch.bfloat16)
    caches = [c.to(kdev) for c in a["caches"]]
    with pytest.raises(ValueError, match="w_RD"):
        _run(triton_norm_qkv_rope_kv, dict(a, w=a["w"][:-16]), 2, 1, 16, kdev, caches)
    with pytest.raises(ValueError, match="residual_TD"):
        _run(triton_norm_qkv_rope_kv, dict(a, res=a["res"].float()), 2, 1, 16, kdev, caches)
    with pytest.raises(ValueError, match="counters_G"):
        _run(triton_norm_qkv_rope_kv, a, 2, 1, 16, kdev, caches, counters_G=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="given together"):
        _run(triton_norm_qkv_rope_kv, dict(a, qk=[a["qk"][0], None]), 2, 1, 16, kdev, caches)


@pytest.mark.parametrize("shape", [(8, 32, 3, False), (16, 64, 2, True)], ids=["loop-ragged", "straight-line"])
def test_fused_input_walks_of_the_gpu_shapes(shape, gen, kdev, check, monkeypatch, seed):
    """The GPU's launch shapes in the interpreter (which otherwise runs one 32-wide tile a step): steps of several
    tiles over a ragged hidden size, and one straight-line step, give the reference."""
    from moelink.kernels import triton_qkv_rope_kv

    bn, bk, tiles, one_step = shape
    monkeypatch.setattr(triton_qkv_rope_kv, "launch_shape", lambda *a, **k: (bn, bk, tiles, one_step, 1))
    D = bk * tiles - 3 if one_step else 200
    a = _inputs(gen, 3, D, 2, 1, 16, 16, 16, True, True, False, torch.float32)
    got_caches = [c.clone().to(kdev) for c in a["caches"]]
    got_q, _ = _run(triton_norm_qkv_rope_kv, a, 2, 1, 16, kdev, got_caches)
    want_caches = [c.clone() for c in a["caches"]]
    want_q, _ = reference_norm_qkv_rope_kv(a["x"], a["res"], a["norm"], 1e-6, a["w"], a["b"], 2, 1, 16, a["pos"],
                                           a["table"], *want_caches, a["slots"], *a["qk"], 1e-6)
    check(got_q, want_q.double(), torch.float32, f"q, {shape}")
    for got, want in zip(got_caches, want_caches):
        check(got, want.double(), torch.float32, "cache")
