"""The INT4 (W4A16) fused MoE at one rank's share of Kimi K2.5 on a GPU (`pytest -m gpu`; skipped without CUDA): the
`int4` step of benchmarks/gpu_session.sh runs it.

48 local experts (Kimi's 384 at EP 8), top-8, D=7168, I=2048, group 32, symmetric bf16 scales (as published), and
a zero-point variant; every path: the decode GEMVs (1 token), the per-tile path (64 and 1024 tokens) and the
dequantize-once path (1024 and 8192 tokens, into one reused workspace). The oracle dequantizes one expert at a time
in float32 (kernels/int4.py's int4_dequantize) and runs the same math; bf16 outputs within 1e-2 relative error. The
kernel runs under sync-debug mode "error": no device→host sync inside it.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from moelink.kernels.int4 import int4_dequantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

E, K, D, I, G = 48, 8, 7168, 2048, 32


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
    g = torch.Generator(device="cuda").manual_seed(44)
    dev = torch.device("cuda")
    i32 = lambda *s: torch.randint(-(2**31), 2**31 - 1, s, dtype=torch.int32, device=dev, generator=g)  # noqa: E731
    sc = lambda *s: (torch.rand(*s, device=dev, generator=g) * 0.5 + 0.5).mul(0.02 / 8).bfloat16()  # noqa: E731
    u4 = lambda *s: torch.randint(0, 16, s, dtype=torch.uint8, device=dev, generator=g)  # noqa: E731
    return dict(w13q=i32(E, 2 * I, D // 8), w13s=sc(E, 2 * I, D // G), w2q=i32(E, D, I // 8), w2s=sc(E, D, I // G),
                w13z=u4(E, 2 * I, D // G), w2z=u4(E, D, I // G))


def oracle(x, L, weights, ids, zp):
    """reference_fused_moe_int4's math, one expert at a time in float32."""
    T = x.shape[0]
    local = ids.reshape(-1).long()
    out = torch.zeros(T, D, dtype=torch.float32, device=x.device)
    for e in torch.unique(local).tolist():
        pairs = (local == e).nonzero().flatten()
        tok = pairs // K
        w13 = int4_dequantize(L["w13q"][e], L["w13s"][e], L["w13z"][e] if zp else None, torch.float32)
        w2 = int4_dequantize(L["w2q"][e], L["w2s"][e], L["w2z"][e] if zp else None, torch.float32)
        h = x[tok].float() @ w13.T
        y = (torch.nn.functional.silu(h[:, :I]) * h[:, I:]) @ w2.T
        out.index_add_(0, tok, y * weights.reshape(-1)[pairs, None].float())
    return out


@pytest.mark.parametrize("T,path,zp", [(1, "auto", False), (64, "auto", True), (1024, "sorted", False),
                                       (1024, "dequant", True), (8192, "auto", False)])
def test_int4_moe_kimi_ep8(layer, T, path, zp):
    from moelink.kernels import moe_config
    from moelink.kernels.moe_config import _pick
    from moelink.kernels.triton_int4_dequant import DequantWorkspace
    from moelink.kernels.triton_moe_int4 import int4_config_table, int4_path, triton_fused_moe_int4

    g = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, D, device="cuda", generator=g).bfloat16()
    weights, ids = torch.topk(torch.randn(T, E, device="cuda", generator=g).softmax(-1), K)
    L = layer
    z = dict(w13_z_EFS=L["w13z"], w2_z_EDS=L["w2z"]) if zp else {}
    table = int4_config_table(E, I, moe_config.device_name(x.device))
    taken = int4_path(_pick(*table, T, K, E), T, K, path)
    if path == "auto":  # int4_moe_default.json: TINY below 2 rows per expert, DEQUANT from 1024 (8192 x 8 / 48 = 1365)
        assert taken == {1: "tiny", 64: "sorted", 8192: "dequant"}[T]
    ws = DequantWorkspace()
    with no_host_sync():
        got = triton_fused_moe_int4(x, L["w13q"], L["w13s"], L["w2q"], L["w2s"], weights, ids, path=path,
                                    workspace=ws, **z)
    want = oracle(x, L, weights, ids, zp)
    err = float((got.float() - want).norm() / want.norm())
    assert err < 1e-2, f"T={T} path={taken}: relative error {err:.3g}"
    assert (ws.nbytes() > 0) == (taken == "dequant")
