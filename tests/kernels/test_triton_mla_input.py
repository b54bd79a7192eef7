"""The fused MLA attention input (latent norm + rotary of q_pe and k_pe + latent write,
kernels/triton_mla_input.py) against its reference (kernels/mla_input.py) and a float64 oracle."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.mla_input import reference_mla_rope_write_latent
from moelink.kernels.rotary import rotary_cos_sin_cache
from moelink.kernels.triton_mla_input import triton_mla_rope_write_latent
from moelink.kernels.triton_mla import triton_write_latent
from moelink.kernels.triton_norm import triton_rms_norm
from moelink.kernels.triton_rotary import triton_rotary

BLOCK = 4


def _table(style, P, positions=512):
    if style == "complex":  # DeepSeek-V2's complex64 table with a YaRN-like factor
        inv = 1.0 / (1e4 ** (torch.arange(0, P, 2, dtype=torch.float32) / P))
        ang = torch.arange(positions, dtype=torch.float32)[:, None] * inv[None, :]
        return torch.polar(torch.ones_like(ang), ang) * 1.0707
    return rotary_cos_sin_cache(P, positions, 1e4)


def _inputs(gen, T, N, C, P, Dn, dtype, cache_dtype=None):
    """q_pe a strided slice of q [T, N, Dn + P]; ckv and k_pe slices of one [T, C + P] projection output."""
    q = torch.randn(T, N, Dn + P, generator=gen).to(dtype)
    kv = torch.randn(T, C + P, generator=gen).to(dtype)
    w = (1 + 0.1 * torch.randn(C, generator=gen)).to(dtype)
    pos = torch.randint(0, 512, (T,), generator=gen)
    cache = torch.zeros(T + 2, BLOCK, C + P, dtype=cache_dtype or dtype)
    slots = torch.randperm(T + 1, generator=gen)[:T] * BLOCK + torch.randint(0, BLOCK, (T,), generator=gen)
    if T > 2:
        slots[1] = -1
    return q[..., Dn:], kv[:, :C], kv[:, C:], pos, w, cache, slots


# (T, N, C, P, Dn, style): V2-Lite-like (complex rope), V3-like (neox after the de-interleave), ragged sizes.
# Complex rope widths keep P/2 a multiple of 8, as the real ones (V2-Lite: 32): torch's CPU complex multiply
# rounds each product in its vector loop, as the kernel does, but contracts into an FMA in its scalar tail.
CASES = [(1, 4, 64, 16, 32, "complex"), (3, 3, 48, 48, 16, "complex"), (2, 4, 64, 16, 32, "neox"),
         (5, 2, 40, 24, 8, "interleaved")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,N,C,P,Dn,style", CASES)
def test_mla_input_matches_reference(T, N, C, P, Dn, style, dtype, gen, kdev, check, seed):
    q_pe, ckv, k_pe, pos, w, cache, slots = _inputs(gen, T, N, C, P, Dn, dtype)
    table = _table(style, P)
    got_cache = cache.clone().to(kdev)
    got_q = triton_mla_rope_write_latent(q_pe.to(kdev), ckv.to(kdev), k_pe.to(kdev), pos.to(kdev), table.to(kdev),
                                         style, w.to(kdev), 1e-6, got_cache, slots.to(kdev))
    assert got_q.shape == (T, N, P) and got_q.is_contiguous()
    want_cache = cache.clone()
    want_q = reference_mla_rope_write_latent(q_pe, ckv, k_pe, pos, table, style, w, 1e-6, want_cache, slots)
    # The rotations are elementwise with the reference's roundings: bit for bit.
    assert torch.equal(got_q.cpu(), want_q), f"q_pe differs (seed={seed})"
    assert torch.equal(got_cache.cpu()[..., C:], want_cache[..., C:]), f"cached rope key differs (seed={seed})"
    # The latent norm: as the unfused Triton norm bit for bit (interpreter), within an ulp or two of torch's.
    if style == "neox":
        ckv_unfused = triton_rms_norm(ckv.to(kdev), w.to(kdev), 1e-6)
        _, k_unfused = triton_rotary(q_pe.to(kdev), k_pe.to(kdev)[:, None, :], pos.to(kdev), table.to(kdev))
        old = cache.clone().to(kdev)
        triton_write_latent(ckv_unfused, k_unfused[:, 0], old, slots.to(kdev))
        assert torch.equal(got_cache.cpu(), old.cpu()), f"cache differs from the unfused path (seed={seed})"
    cache64 = cache.double()
    want64_q = reference_mla_rope_write_latent(q_pe.double(), ckv.double(), k_pe.double(), pos, table, style,
                                               w.double(), 1e-6, cache64, slots)
    check(got_q, want64_q, dtype, "q_pe")
    check(got_cache, cache64, dtype, "latent cache")
    if T > 2:  # the padding token wrote nothing
        assert int((got_cache.cpu() != 0).any(-1).sum()) == T - 1


def test_mla_input_fp8_cache(gen, kdev, seed):
    T, N, C, P, Dn = 3, 2, 32, 16, 8
    q_pe, ckv, k_pe, pos, w, cache, slots = _inputs(gen, T, N, C, P, Dn, torch.bfloat16, torch.float8_e4m3fn)
    table = _table("complex", P)
    got = cache.clone().to(kdev)
    triton_mla_rope_write_latent(q_pe.to(kdev), ckv.to(kdev), (k_pe * 600).to(kdev), pos.to(kdev), table.to(kdev),
                                 "complex", w.to(kdev), 1e-6, got, slots.to(kdev), 0.5)
    want = cache.clone()
    reference_mla_rope_write_latent(q_pe, ckv, k_pe * 600, pos, table, "complex", w, 1e-6, want, slots, 0.5)
    g, r = got.cpu().float(), want.float()
    assert g.abs().max() == 448, "saturated to e4m3's range"
    # e4m3 keeps 3 mantissa bits: an ulp of the latent's rounding may move a code by one step.
    assert torch.equal(g[..., C:], r[..., C:]), f"fp8 rope key (seed={seed})"
    assert float(((g - r).abs() / r.abs().clamp_min(2 ** -6)).max()) <= 0.125 + 1e-6


def test_mla_input_rejects_bad_inputs(gen, kdev):
    q_pe, ckv, k_pe, pos, w, cache, slots = _inputs(gen, 2, 2, 32, 8, 8, torch.float32)
    args = [t.to(kdev) for t in (q_pe, ckv, k_pe, pos)]
    with pytest.raises(ValueError, match="style='yarn' is invalid"):
        triton_mla_rope_write_latent(*args, _table("neox", 8).to(kdev), "yarn", w.to(kdev), 1e-6, cache, slots)
    with pytest.raises(ValueError, match="complex64"):
        triton_mla_rope_write_latent(*args, _table("neox", 8).to(kdev), "complex", w.to(kdev), 1e-6, cache, slots)
    with pytest.raises(ValueError, match="norm_C"):
        triton_mla_rope_write_latent(*args, _table("neox", 8).to(kdev), "neox", w[:16].to(kdev), 1e-6, cache, slots)
