"""The NVFP4 fused MoE at Qwen3-30B-A3B's expert shape on a GPU (`pytest -m gpu`; skipped without CUDA).

E=128 experts, top-8, D=2048, I=768, weights in ModelOpt's layout (random bytes, e4m3 block scales in [224, 448],
gate and up with different global scales), SiLU. The oracle dequantizes one expert at a time in float32 and runs
the same math; bf16 outputs must be within 1e-2 relative error. The kernel runs under sync-debug mode "error": no
device→host sync inside it.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from moelink.kernels.moe_config import MoELaunchConfig
from moelink.kernels.nvfp4 import nvfp4_dequantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

E, K, D, I = 128, 8, 2048, 768  # Qwen3-30B-A3B


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
    from moelink.benchmarks.moe_nvfp4 import make_layer

    return make_layer(E, D, I, torch.device("cuda"), torch.Generator(device="cuda").manual_seed(1234))


def oracle(x, L, weights, ids, emap=None):
    """reference_fused_moe_nvfp4's math, one expert at a time in float32."""
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
        gate = nvfp4_dequantize(L["w13q"][e, :I], L["w13s"][e, :I], L["w13g"][e, 0], torch.float32)
        up = nvfp4_dequantize(L["w13q"][e, I:], L["w13s"][e, I:], L["w13g"][e, 1], torch.float32)
        w2 = nvfp4_dequantize(L["w2q"][e], L["w2s"][e], L["w2g"][e], torch.float32)
        xe = x[tok].float()
        y = (torch.nn.functional.silu(xe @ gate.T) * (xe @ up.T)) @ w2.T
        out.index_add_(0, tok, y * weights.reshape(-1)[pairs, None].float())
    return out


BK128 = MoELaunchConfig.from_dict({"BLOCK_SIZE_M": 64, "BLOCK_SIZE_N": 64, "BLOCK_SIZE_K": 128, "GROUP_SIZE_M": 8,
                                   "num_warps": 8, "num_stages": 3})


@pytest.mark.parametrize("T,variant", [(1, "sum"), (64, "map"), (512, "atomic"), (2048, "bk128")])
def test_nvfp4_moe_qwen3_30b_a3b(layer, T, variant):
    from moelink.kernels.triton_moe_nvfp4 import triton_fused_moe_nvfp4

    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    weights, ids = torch.topk(torch.randn(T, E, device="cuda", generator=g).softmax(-1), K)
    emap = None
    if variant == "map":  # EP: this rank holds the even global experts (local e = g // 2), 256 global
        ids = ids * 2 + (torch.rand(T, K, device="cuda", generator=g) < 0.5)
        emap = torch.where(torch.arange(2 * E, device="cuda") % 2 == 0, torch.arange(2 * E, device="cuda") // 2,
                           -1).int()
    want = oracle(x, layer, weights, ids, emap)
    args = (x, layer["w13q"], layer["w13s"], layer["w13g"], layer["w2q"], layer["w2s"], layer["w2g"], weights, ids,
            emap)
    kw = dict(combine="atomic" if variant == "atomic" else "sum", config=BK128 if variant == "bk128" else None)
    triton_fused_moe_nvfp4(*args, **kw)  # compile outside the sync check
    with no_host_sync():
        got = triton_fused_moe_nvfp4(*args, **kw)
    torch.cuda.synchronize()
    assert torch.isfinite(got).all()
    err = float((got.float() - want).norm() / want.norm())
    assert err < 1e-2, f"relative error {err:.3g} (T={T} {variant})"
