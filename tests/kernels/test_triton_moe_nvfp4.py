"""The NVFP4 Triton fused MoE (kernels/triton_moe_nvfp4.py) in the interpreter against reference_fused_moe_nvfp4 in
float64 (exact dequantization, so the only error is the kernel's own rounding of activations and h).

Ragged shapes (reduction dims that are multiples of 16 but not of BLOCK_K, N off the block), experts with no
tokens, expert maps with -1, EP holes (id -1), gate and up global scales that differ, biases and SiLU; fresh
seeds; NaN-poisoned output and workspaces (conftest.py). The tl.dot_scaled branch runs only on a GPU of compute
capability >= 10 (the interpreter reads dot_scaled scales as E8M0, module docstring)."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.moe import SILU, MoEActivation
from moelink.kernels.moe_config import MoELaunchConfig
from moelink.kernels.nvfp4 import nvfp4_dequantize, nvfp4_quantize, reference_fused_moe_nvfp4
from moelink.kernels.triton_moe_nvfp4 import nvfp4_dequant_tile, triton_fused_moe_nvfp4
from tests.helpers.moe_cases import DTYPES, SMALL, WIDE, expert_map, routing

OAI = MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)
BK64 = MoELaunchConfig.from_dict({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
                                  "num_warps": 4, "num_stages": 2,
                                  "down": {"BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 2,
                                           "num_warps": 4, "num_stages": 2}})

# (T, E local, G global, K, D, I, routing, config, combine, activation, biases)
CASES = [
    (13, 6, 6, 3, 80, 48, "rand", BK64, "sum", SILU, False),  # D=80 off BK=64, I=48 off the down BK=128: masked K
    (23, 5, 12, 4, 64, 96, "map", SMALL, "atomic", SILU, False),  # expert map (7 of 12 remote), atomic combine
    (1, 4, 4, 2, 32, 32, "rand", WIDE, "sum", SILU, False),  # decode: one token, experts with no tokens (BK 16→32)
    (19, 3, 9, 3, 112, 48, "map", BK64, "sum", OAI, True),  # biases, clamped SwiGLU, remote experts, D=112 off BK
    (70, 4, 4, 2, 32, 64, "rand", None, "sum", SILU, False),  # JSON config path (interpreter.json)
]


def _weights(gen, E, D, I):
    """NVFP4 experts whose gate and up halves are quantized apart (their own weight_scale_2, as ModelOpt writes
    per-expert gate_proj / up_proj), with deliberately different scales."""
    gate = torch.randn(E, I, D, generator=gen) / D**0.5 * 2
    up = torch.randn(E, I, D, generator=gen) / D**0.5 * 0.5
    w2 = torch.randn(E, D, I, generator=gen) / I**0.5
    (gq, gs, gg), (uq, us, ug), (dq, ds, dg) = nvfp4_quantize(gate), nvfp4_quantize(up), nvfp4_quantize(w2)
    assert not torch.equal(gg, ug)
    return torch.cat((gq, uq), 1), torch.cat((gs, us), 1), torch.stack((gg, ug), 1), dq, ds, dg


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,E,G,K,D,I,mode,cfg,combine,act,biases", CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_fused_moe_nvfp4_matches_reference(T, E, G, K, D, I, mode, cfg, combine, act, biases, dtype, gen, kdev,
                                           check, nan_buffer):
    w = _weights(gen, E, D, I)
    b13 = torch.randn(E, 2 * I, generator=gen).to(dtype) if biases else None
    b2 = torch.randn(E, D, generator=gen).to(dtype) if biases else None
    x = (torch.randn(T, D, generator=gen) * 2).to(dtype)
    ids = routing(gen, T, G, K)
    if T > 2:
        ids[::3, -1] = -1  # EP receive-buffer holes
    weights = torch.rand(T, K, generator=gen)
    emap = expert_map(gen, G, E) if mode == "map" else None
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want = reference_fused_moe_nvfp4(x.double(), *w, weights.double(), ids, emap, b13_EF=d(b13), b2_ED=d(b2),
                                     activation=act)
    dev = lambda t: None if t is None else t.to(kdev)  # noqa: E731
    out = nan_buffer((T, D), dtype, kdev)
    got = triton_fused_moe_nvfp4(dev(x), *map(dev, w), dev(weights), dev(ids), dev(emap), b13_EF=dev(b13),
                                 b2_ED=dev(b2), activation=act, out=out, config=cfg, combine=combine)
    assert got is out
    check(got, want, dtype, f"fused_moe_nvfp4 T={T} E={E} {mode} {combine}")
    if mode == "map":  # tokens whose every expert is remote (or a hole) come out exactly zero
        ok = ids >= 0
        remote = ~(ok & (emap[ids.clamp(min=0)] >= 0)).any(1)
        assert (got.cpu()[remote] == 0).all()


def test_gate_and_up_global_scales_are_applied_apart(gen, kdev, check):
    """Swapping gate's and up's weight_scale_2 changes the answer (the kernel reads each for its own half)."""
    T, E, K, D, I = 5, 2, 2, 32, 32
    w = list(_weights(gen, E, D, I))
    x, ids, weights = torch.randn(T, D, generator=gen), routing(gen, T, E, K), torch.rand(T, K, generator=gen)
    swapped = w[2].flip(1).contiguous()
    for g in (w[2], swapped):
        ww = [*w[:2], g, *w[3:]]
        want = reference_fused_moe_nvfp4(x.double(), *ww, weights.double(), ids)
        got = triton_fused_moe_nvfp4(x.to(kdev), *(t.to(kdev) for t in ww), weights.to(kdev), ids.to(kdev), config=SMALL)
        check(got, want, torch.float32, "nvfp4 global scales")
    a = reference_fused_moe_nvfp4(x.double(), *w, weights.double(), ids)
    b = reference_fused_moe_nvfp4(x.double(), *w[:2], swapped, *w[3:], weights.double(), ids)
    assert (a - b).norm() > 1e-3 * a.norm()


def test_dequant_tile_is_the_reference(gen, kdev):
    """The in-register dequantization alone, at every byte value and every finite e4m3 scale, equals
    nvfp4_dequantize (without the global scale), bit for bit in float32."""
    import triton
    import triton.language as tl

    @triton.jit
    def kern(q_ptr, s_ptr, w_ptr, N: tl.constexpr, K: tl.constexpr):
        n = tl.arange(0, N)
        q = tl.load(q_ptr + n[:, None] * (K // 2) + tl.arange(0, K // 2)[None, :])
        s = tl.load(s_ptr + n[:, None] * (K // 16) + tl.arange(0, K // 16)[None, :])
        w = nvfp4_dequant_tile(q, s, N, K, tl.float32)  # [K, N]
        tl.store(w_ptr + tl.arange(0, K)[:, None] * N + n[None, :], w)

    N, K = 16, 512
    q = torch.arange(N * K // 2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(N, K // 2)
    finite = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)  # 0x7F/0xFF are NaN
    s = finite[torch.randint(0, len(finite), (N, K // 16), generator=gen)]
    s[0, :4] = torch.tensor([0x00, 0x01, 0x7E, 0x08], dtype=torch.uint8)  # 0, the smallest subnormal, 448, 2**-6
    s = s.view(torch.float8_e4m3fn)
    w = torch.full((K, N), float("nan"), device=kdev)
    kern[(1,)](q.to(kdev), s.view(torch.uint8).to(kdev), w, N, K)  # (the wrapper passes the scales' bytes)
    want = nvfp4_dequantize(q, s, 1.0, torch.float32)
    assert torch.equal(w.cpu().T.view(torch.int32), want.view(torch.int32))


def _native_runs() -> bool:
    from moelink.kernels.triton_moe_nvfp4 import _triton_version

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 10 and _triton_version() >= (3, 9)


@pytest.mark.skipif(not _native_runs(), reason="tl.dot_scaled with e4m3 scales: run compiled on Blackwell with "
                                               "Triton >= 3.9 only (module docstring)")
@pytest.mark.parametrize("case", [0, 2], ids=["masked-K", "decode"])
def test_native_dot_scaled_branch(case, gen, check):
    T, E, G, K, D, I, mode, cfg, combine, act, biases = CASES[case]
    w = _weights(gen, E, D, I)
    x = (torch.randn(T, D, generator=gen) * 2).to(torch.bfloat16)
    ids, weights = routing(gen, T, G, K), torch.rand(T, K, generator=gen)
    want = reference_fused_moe_nvfp4(x.double(), *w, weights.double(), ids)
    got = triton_fused_moe_nvfp4(x.cuda(), *(t.cuda() for t in w), weights.cuda(), ids.cuda(), config=cfg,
                                 combine=combine, native=True)
    check(got, want, torch.bfloat16, f"fused_moe_nvfp4 native T={T}")


def test_fused_moe_nvfp4_empty_batch_and_bad_input(kdev):
    E, D, I = 2, 64, 32
    f8 = torch.float8_e4m3fn
    w = [torch.zeros(E, 2 * I, D // 2, dtype=torch.uint8), torch.zeros(E, 2 * I, D // 16).to(f8), torch.ones(E, 2),
         torch.zeros(E, D, I // 2, dtype=torch.uint8), torch.zeros(E, D, I // 16).to(f8), torch.ones(E)]
    w = [t.to(kdev) for t in w]
    out = triton_fused_moe_nvfp4(torch.zeros(0, D, device=kdev), *w, torch.zeros(0, 2, device=kdev),
                                 torch.zeros(0, 2, dtype=torch.long, device=kdev))
    assert out.shape == (0, D)
    x = torch.zeros(3, D, device=kdev)
    route = (torch.zeros(3, 2, device=kdev), torch.zeros(3, 2, dtype=torch.long, device=kdev))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        triton_fused_moe_nvfp4(x, w[0], w[1].float(), *w[2:], *route)
    with pytest.raises(ValueError, match="do not fit"):
        triton_fused_moe_nvfp4(torch.zeros(3, 96, device=kdev), *w, *route)
    with pytest.raises(ValueError, match=r"w13_scale2_E2"):
        triton_fused_moe_nvfp4(x, *w[:2], w[2][:, 0], *w[3:], *route)
    with pytest.raises(ValueError, match="native"):
        triton_fused_moe_nvfp4(x, *w, *route, native=True)


def test_both_kernel_strategies_take_the_reference_signature():
    import inspect

    from moelink.kernels.ops import ReferenceKernels, TritonKernels

    want = inspect.signature(ReferenceKernels().fused_moe_nvfp4).parameters
    got = inspect.signature(TritonKernels().fused_moe_nvfp4).parameters
    assert list(want) == list(got)[: len(want)]


def test_the_native_path_narrows_a_down_tile_that_would_spill():
    """tl.dot_scaled's down GEMM spilled at 128 x 256 with 8 warps (sm_100, Triton 3.9): the native launch halves
    its BLOCK_N to 64 accumulator values a thread; the dequantizing path keeps the config's tiles."""
    from moelink.kernels.moe_config import MoELaunchConfig
    from moelink.kernels.triton_moe_nvfp4 import NATIVE_MAX_ACC, nvfp4_config

    cfg = MoELaunchConfig.from_dict({"BLOCK_SIZE_M": 128, "BLOCK_SIZE_N": 128, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
                                     "num_warps": 8, "num_stages": 4,
                                     "down": {"BLOCK_SIZE_N": 256, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 8,
                                              "num_warps": 8, "num_stages": 4}})
    native, plain = nvfp4_config(cfg, native=True), nvfp4_config(cfg)
    assert plain.down.BLOCK_SIZE_N == 256 and native.down.BLOCK_SIZE_N == 128
    assert 128 * native.down.BLOCK_SIZE_N <= NATIVE_MAX_ACC * 32 * 8 and native.up == plain.up
