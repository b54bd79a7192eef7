"""The MXFP4 Triton fused MoE (kernels/triton_moe_mxfp4.py) in the interpreter against reference_fused_moe_mxfp4
in float64 (exact dequantization, so the only error is the kernel's own rounding of activations and h).

Ragged shapes (reduction dims that are multiples of 32 but not of BLOCK_K, N off the block), experts with no
tokens, expert maps with -1, EP holes (id -1), biases, swiglu_oai and SiLU; fresh seeds; NaN-poisoned output and
workspaces (conftest.py)."""
from __future__ import annotations

import pytest
import torch

from moelink.kernels.moe import SILU, MoEActivation
from moelink.kernels.moe_config import MoELaunchConfig
from moelink.kernels.mxfp4 import mxfp4_dequantize, mxfp4_quantize, reference_fused_moe_mxfp4
from moelink.kernels.triton_moe_mxfp4 import triton_fused_moe_mxfp4
from moelink.kernels.triton_mxfp4_dequant import dequant_words, dequant_words_bf16
from tests.helpers.moe_cases import DTYPES, SMALL, WIDE, expert_map, routing

OAI = MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)
V4_CLAMP = MoEActivation("silu_clamp", limit=0.6)  # DeepSeek-V4's FP4 experts (moe/expert_weights_mxfp4_split.py)
BK64 = MoELaunchConfig.from_dict({"BLOCK_SIZE_M": 16, "BLOCK_SIZE_N": 16, "BLOCK_SIZE_K": 64, "GROUP_SIZE_M": 1,
                            "num_warps": 4, "num_stages": 2,
                            "down": {"BLOCK_SIZE_N": 32, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 2, "num_warps": 4,
                                     "num_stages": 2}})

# (T, E local, G global, K, D, I, routing, config, combine, activation, biases)
CASES = [
    (13, 6, 6, 3, 96, 64, "rand", BK64, "sum", OAI, True),  # D=96 off BK=64, I=64 off the down BK=128: masked K
    (23, 5, 12, 4, 64, 96, "map", SMALL, "atomic", OAI, True),  # expert map (7 of 12 remote), atomic combine
    (1, 4, 4, 2, 32, 32, "rand", WIDE, "sum", OAI, True),  # decode: one token, experts with no tokens (WIDE: BK 16→32)
    (37, 5, 5, 1, 64, 32, "one", SMALL, "sum", SILU, False),  # every token on expert 0, SiLU, no biases
    (19, 3, 9, 3, 160, 96, "map", BK64, "sum", SILU, True),  # SiLU with biases, remote experts, D=160 off BK
    (70, 4, 4, 2, 32, 64, "rand", None, "sum", OAI, True),  # JSON config path (interpreter.json)
    (1, 6, 6, 2, 32, 32, "rand", None, "sum", V4_CLAMP, False),  # DeepSeek-V4 FP4 decode: clamped SiLU, no biases
    (17, 3, 6, 2, 64, 32, "map", SMALL, "sum", V4_CLAMP, False),  # ... a prefill chunk at EP 2 (3 of 6 experts local)
]


def _weights(gen, E, D, I, biases):
    w13 = torch.randn(E, 2 * I, D, generator=gen) / D**0.5 * 2
    w2 = torch.randn(E, D, I, generator=gen) / I**0.5
    w13q, w13s = mxfp4_quantize(w13)
    w2q, w2s = mxfp4_quantize(w2)
    b13 = torch.randn(E, 2 * I, generator=gen) if biases else None
    b2 = torch.randn(E, D, generator=gen) if biases else None
    return w13q, w13s, w2q, w2s, b13, b2


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("T,E,G,K,D,I,mode,cfg,combine,act,biases", CASES)
@pytest.mark.slow  # over 1 s (junit, 2026-11-26): not in the quick loop
def test_fused_moe_mxfp4_matches_reference(T, E, G, K, D, I, mode, cfg, combine, act, biases, dtype, gen, kdev,
                                           check, nan_buffer):
    w13q, w13s, w2q, w2s, b13, b2 = _weights(gen, E, D, I, biases)
    b13, b2 = (None if b is None else b.to(dtype) for b in (b13, b2))
    x = (torch.randn(T, D, generator=gen) * 2).to(dtype)
    ids = routing(gen, T, G, K, "one" if mode == "one" else "rand")
    if T > 2:
        ids[::3, -1] = -1  # EP receive-buffer holes
    weights = torch.rand(T, K, generator=gen)
    emap = expert_map(gen, G, E) if mode == "map" else None
    d = lambda t: None if t is None else t.double()  # noqa: E731
    want = reference_fused_moe_mxfp4(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, emap,
                                     b13_EF=d(b13), b2_ED=d(b2), activation=act)
    dev = lambda t: None if t is None else t.to(kdev)  # noqa: E731
    out = nan_buffer((T, D), dtype, kdev)
    got = triton_fused_moe_mxfp4(dev(x), dev(w13q), dev(w13s), dev(w2q), dev(w2s), dev(weights), dev(ids), dev(emap),
                                 b13_EF=dev(b13), b2_ED=dev(b2), activation=act, out=out, config=cfg, combine=combine)
    assert got is out
    check(got, want, dtype, f"fused_moe_mxfp4 {act.kind} T={T} E={E} {mode} {combine}")
    if mode == "map":  # tokens whose every expert is remote (or a hole) come out exactly zero
        ok = ids >= 0
        remote = ~(ok & (emap[ids.clamp(min=0)] >= 0)).any(1)
        assert (got.cpu()[remote] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("case", [0, 2], ids=["masked-K", "decode"])
def test_native_dot_scaled_branch(case, dtype, gen, kdev, check, nan_buffer):
    """native=True (tl.dot_scaled) computes the same thing; on CPU this runs Triton's interpreter emulation of it."""
    T, E, G, K, D, I, mode, cfg, combine, act, biases = CASES[case]
    w13q, w13s, w2q, w2s, b13, b2 = _weights(gen, E, D, I, biases)
    x = (torch.randn(T, D, generator=gen) * 2).to(dtype)
    ids = routing(gen, T, G, K)
    weights = torch.rand(T, K, generator=gen)
    want = reference_fused_moe_mxfp4(x.double(), w13q, w13s, w2q, w2s, weights.double(), ids, b13_EF=b13.double(),
                                     b2_ED=b2.double(), activation=act)
    dev = lambda t: t.to(kdev)  # noqa: E731
    got = triton_fused_moe_mxfp4(*map(dev, (x, w13q, w13s, w2q, w2s, weights, ids)), b13_EF=dev(b13), b2_ED=dev(b2),
                                 activation=act, config=cfg, combine=combine, native=True,
                                 out=nan_buffer((T, D), dtype, kdev))
    check(got, want, dtype, f"fused_moe_mxfp4 native T={T}")


@pytest.mark.filterwarnings("ignore:overflow encountered")  # 2**127 * 6 is inf in fp32: both sides, on purpose
@pytest.mark.parametrize("decode", ["fp32", "bf16"])
def test_dequant_words_is_the_reference(decode, gen, kdev):
    """The in-register dequantization alone (int32 words), at every byte value and extreme exponents (2**-127 a
    subnormal scale, 2**127 * 6 inf): `dequant_words` (fp32: the GEMVs and the pre-pass) and `dequant_words_bf16`
    (the per-tile K loop: bf16 bit patterns, subnormal code 1 included, and two bf16 products) equal
    mxfp4_dequantize bit for bit in their dtype."""
    import triton
    import triton.language as tl

    @triton.jit
    def kern(q_ptr, s_ptr, w_ptr, N: tl.constexpr, K: tl.constexpr, BF16: tl.constexpr, INTERPRET: tl.constexpr):
        n = tl.arange(0, N)
        q = tl.load(q_ptr + n[:, None] * (K // 8) + tl.arange(0, K // 8)[None, :])
        s = tl.load(s_ptr + n[:, None] * (K // 32) + tl.arange(0, K // 32)[None, :])
        if BF16:
            w = dequant_words_bf16(q, s, N, K, INTERPRET)  # [N, K]
        else:
            w = dequant_words(q, s, N, K)
        tl.store(w_ptr + n[:, None] * K + tl.arange(0, K)[None, :], w)

    N, K = 16, 512
    dt = torch.bfloat16 if decode == "bf16" else torch.float32
    q = torch.arange(N * K // 2, dtype=torch.int64).remainder(256).to(torch.uint8).reshape(N, K // 32, 16)
    s = torch.randint(0, 255, (N, K // 32), dtype=torch.uint8, generator=gen)
    s[0, :4] = torch.tensor([0, 1, 127, 254], dtype=torch.uint8)
    s[1, :4] = torch.tensor([2, 126, 128, 253], dtype=torch.uint8)
    w = torch.full((N, K), float("nan"), device=kdev, dtype=dt)
    kern[(1,)](q.view(torch.int32).to(kdev), s.to(kdev), w, N, K, decode == "bf16", w.device.type == "cpu")
    want = mxfp4_dequantize(q, s, dt)
    bits = torch.int16 if dt == torch.bfloat16 else torch.int32
    assert torch.equal(w.cpu().view(bits), want.view(bits))


def test_fused_moe_mxfp4_empty_batch_and_bad_input(kdev):
    E, D, I = 2, 64, 32
    w13q, w13s = torch.zeros(E, 2 * I, D // 32, 16, dtype=torch.uint8), torch.zeros(E, 2 * I, D // 32, dtype=torch.uint8)
    w2q, w2s = torch.zeros(E, D, I // 32, 16, dtype=torch.uint8), torch.zeros(E, D, I // 32, dtype=torch.uint8)
    w = [t.to(kdev) for t in (w13q, w13s, w2q, w2s)]
    x0 = torch.zeros(0, D, device=kdev)
    out = triton_fused_moe_mxfp4(x0, *w, torch.zeros(0, 2, device=kdev), torch.zeros(0, 2, dtype=torch.long, device=kdev))
    assert out.shape == (0, D)
    x = torch.zeros(3, D, device=kdev)
    route = (torch.zeros(3, 2, device=kdev), torch.zeros(3, 2, dtype=torch.long, device=kdev))
    with pytest.raises(ValueError, match="uint8"):
        triton_fused_moe_mxfp4(x, w[0].float(), *w[1:], *route)
    with pytest.raises(ValueError, match="do not fit"):
        triton_fused_moe_mxfp4(torch.zeros(3, 96, device=kdev), *w, *route)
    with pytest.raises(ValueError, match="b2_ED"):
        triton_fused_moe_mxfp4(x, *w, *route, b2_ED=torch.zeros(E, 2 * D, device=kdev))
    with pytest.raises(ValueError, match="native"):
        triton_fused_moe_mxfp4(x, *w, *route, native=True)
    with pytest.raises(ValueError, match="combine"):
        triton_fused_moe_mxfp4(x, *w, *route, combine="max")


def test_both_kernel_strategies_take_the_reference_signature():
    """ops.ReferenceKernels / TritonKernels: fused_moe_mxfp4 on both, and the Triton fused_moe and fused_moe_mxfp4
    accept every parameter of their references (biases and activation included) under the same names."""
    import inspect

    from moelink.kernels.ops import ReferenceKernels, TritonKernels

    ref, tri = ReferenceKernels(), TritonKernels()
    for name in ("fused_moe", "fused_moe_mxfp4"):
        want = inspect.signature(getattr(ref, name)).parameters
        got = inspect.signature(getattr(tri, name)).parameters
        assert list(want) == list(got)[: len(want)], name
        assert {"b13_EF", "b2_ED", "activation"} <= set(got), name
