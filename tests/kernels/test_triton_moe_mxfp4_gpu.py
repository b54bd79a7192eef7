"""The MXFP4 fused MoE at gpt-oss-120b's expert shape on a GPU (`pytest -m gpu`; skipped without CUDA).

E=128 experts, top-4, D=2880, I=2880 (neither a multiple of 64 x 2: the K tails are masked at BLOCK_K=128), weights
in the published layout with realistic E8M0 exponents, bf16 biases, swiglu_oai. The oracle dequantizes one expert
at a time in float32 (the whole layer in float32 would be 12 GB) and runs the same math; bf16 outputs must be
within 1e-2 relative error. The kernel runs under sync-debug mode "error": no device→host sync inside it.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from moelink.kernels.moe import MoEActivation
from moelink.kernels.moe_config import MoELaunchConfig
from moelink.kernels.mxfp4 import mxfp4_dequantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

E, K, D, I = 128, 4, 2880, 2880  # gpt-oss-120b
ACT = MoEActivation("swiglu_oai", alpha=1.702, limit=7.0)


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.fixture(scope="module")
def layer():
    g = torch.Generator(device="cuda").manual_seed(1234)
    dev = torch.device("cuda")
    u8 = lambda *s, lo=0, hi=256: torch.randint(lo, hi, s, dtype=torch.uint8, device=dev, generator=g)  # noqa: E731
    # exponents 118..122: |w| up to 6 * 2**-5, about gpt-oss's spread
    return dict(w13q=u8(E, 2 * I, D // 32, 16), w13s=u8(E, 2 * I, D // 32, lo=118, hi=123),
                w2q=u8(E, D, I // 32, 16), w2s=u8(E, D, I // 32, lo=118, hi=123),
                b13=(torch.randn(E, 2 * I, device=dev, generator=g) * 0.1).bfloat16(),
                b2=(torch.randn(E, D, device=dev, generator=g) * 0.1).bfloat16())


def oracle(x, L, weights, ids, emap=None):
    """reference_fused_moe_mxfp4's math, one expert at a time in float32."""
    T = x.shape[0]
    local = ids.reshape(-1).long()
    if emap is not None:
        local = torch.where(local >= 0, emap.long()[local.clamp(min=0)], -1)
    out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    for e in torch.unique(local).tolist():
        if e < 0:
            continue
        pairs = (local == e).nonzero().flatten()
        tok = pairs // K
        w13 = mxfp4_dequantize(L["w13q"][e], L["w13s"][e], torch.float32)
        w2 = mxfp4_dequantize(L["w2q"][e], L["w2s"][e], torch.float32)
        h = x[tok].float() @ w13.T + L["b13"][e].float()
        y = ACT(h[:, :I], h[:, I:]) @ w2.T + L["b2"][e].float()
        out.index_add_(0, tok, y * weights.reshape(-1)[pairs, None].float())
    return out


def _pair_order(args):
    """The MoE's arguments with the blocks in kernels/mxfp4.to_pair_order's nibble order."""
    from moelink.kernels.mxfp4 import to_pair_order

    x, w13q, w13s, w2q, w2s, *rest = args
    return (x, to_pair_order(w13q), w13s, to_pair_order(w2q), w2s, *rest)


BK128 = MoELaunchConfig.from_dict({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 8,
                             "num_warps": 8, "num_stages": 3})


# "tile128": the per-tile path forced where the DEQUANT bucket would dequantize first: its 128-row blocks at 4 warps
# (one warpgroup over 128 rows), the bf16 decode with the scales loaded a step ahead (round3 4 times it).
@pytest.mark.parametrize("T,variant", [(1, "sum"), (64, "map"), (512, "atomic"), (2048, "bk128"), (4096, "tile128")])
def test_mxfp4_moe_gpt_oss_120b(layer, T, variant):
    from moelink.kernels.triton_moe_mxfp4 import triton_fused_moe_mxfp4

    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    logits = torch.randn(T, E, device="cuda", generator=g)
    weights, ids = torch.topk(logits.softmax(-1), K)
    emap = None
    if variant == "map":  # EP: this rank holds the even global experts (local e = g // 2), 256 global
        ids = ids * 2 + (torch.rand(T, K, device="cuda", generator=g) < 0.5)
        emap = torch.where(torch.arange(2 * E, device="cuda") % 2 == 0, torch.arange(2 * E, device="cuda") // 2,
                           -1).int()
    want = oracle(x, layer, weights, ids, emap)
    args = (x, layer["w13q"], layer["w13s"], layer["w2q"], layer["w2s"], weights, ids, emap)
    kw = dict(b13_EF=layer["b13"], b2_ED=layer["b2"], activation=ACT, native=False,
              combine="atomic" if variant == "atomic" else "sum", config=BK128 if variant == "bk128" else None,
              path="sorted" if variant == "tile128" else "auto")
    if variant == "tile128":  # the blocks in the decode's pair order, as the engine holds them on a GPU
        args, kw = _pair_order(args), dict(kw, pair_order=True)
    triton_fused_moe_mxfp4(*args, **kw)  # compile outside the sync check
    with no_host_sync():
        got = triton_fused_moe_mxfp4(*args, **kw)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    err = float((got.float() - want).norm() / want.norm())
    assert err < 1e-2, f"relative error {err:.3g} (T={T} {variant})"


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 10,
                    reason="tl.dot_scaled's native path needs sm_100+")
def test_mxfp4_moe_native_dot_scaled(layer):
    from moelink.kernels.triton_moe_mxfp4 import triton_fused_moe_mxfp4

    g = torch.Generator(device="cuda").manual_seed(7)
    x = torch.randn(256, D, device="cuda", generator=g).bfloat16()
    weights, ids = torch.topk(torch.randn(256, E, device="cuda", generator=g).softmax(-1), K)
    want = oracle(x, layer, weights, ids)
    got = triton_fused_moe_mxfp4(x, layer["w13q"], layer["w13s"], layer["w2q"], layer["w2s"], weights, ids,
                                 b13_EF=layer["b13"], b2_ED=layer["b2"], activation=ACT, native=True)
    err = float((got.float() - want).norm() / want.norm())
    assert err < 1e-2, f"relative error {err:.3g} (native)"


@pytest.mark.parametrize("T,path,variant", [(1, "auto", "sum"), (48, "tiny", "map"), (300, "dequant", "map"),
                                            (4096, "dequant", "sum")])
def test_mxfp4_decode_and_prefill_paths_gpt_oss_120b(layer, T, path, variant):
    """The two GEMVs (kernels/triton_moe_mxfp4_tiny.py; 1 token: picked by mxfp4_moe_default.json) and the
    dequantize-once path at gpt-oss-120b's shape; no host sync; bit-identical run to run (fixed summation
    orders)."""
    from moelink.kernels.triton_moe_mxfp4 import triton_fused_moe_mxfp4

    g = torch.Generator(device="cuda").manual_seed(100 + T)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    weights, ids = torch.topk(torch.randn(T, E, device="cuda", generator=g).softmax(-1), K)
    emap = None
    if variant == "map":  # EP: the even global experts are local (e = g // 2), and a receive-buffer hole
        ids = ids * 2 + (torch.rand(T, K, device="cuda", generator=g) < 0.5)
        ids[0, -1] = -1
        emap = torch.where(torch.arange(2 * E, device="cuda") % 2 == 0, torch.arange(2 * E, device="cuda") // 2,
                           -1).int()
    want = oracle(x, layer, weights, ids, emap)
    args = (x, layer["w13q"], layer["w13s"], layer["w2q"], layer["w2s"], weights, ids, emap)
    kw = dict(b13_EF=layer["b13"], b2_ED=layer["b2"], activation=ACT, path=path)
    if T in (48, 4096):  # the GEMVs and the pre-pass on the blocks in the decode's pair order (the engine's form)
        args, kw = _pair_order(args), dict(kw, pair_order=True)
    first = triton_fused_moe_mxfp4(*args, **kw).clone()  # compile outside the sync check
    with no_host_sync():
        got = triton_fused_moe_mxfp4(*args, **kw)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all() and torch.equal(got, first)
    err = float((got.float() - want).norm() / want.norm())
    assert err < 1e-2, f"relative error {err:.3g} (T={T} {path} {variant})"
