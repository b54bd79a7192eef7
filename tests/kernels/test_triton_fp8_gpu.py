"""FP8 block-scaled kernels at the published FP8 checkpoints' shapes on a GPU (`pytest -m gpu`; skipped without
CUDA): DeepSeek-V3 experts (G=256 global, top-8, D=7168, I=2048; 32 of them local, as one rank of EP=8 holds
them: all 256 would be 11 GB of fp8 weights and the oracle dequantizes per expert anyway) and Qwen3-30B-A3B
(E=128, top-8, D=2048, I=768, all local). Oracle: fp8.reference_fused_moe_fp8 / reference_fp8_linear on the
same fp8 weights, in float32 on the GPU. Tolerances as in test_triton_fp8.py's docstring (the products are
exact, the fp32 summation order differs, the intermediate's fp8 rounding may flip for a few elements), here
normwise over bf16 outputs. Each kernel call also runs under sync-debug "error": no device→host sync.
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch

from moelink.kernels.fp8 import block_quantize, per_token_group_quant, reference_fp8_linear, reference_fused_moe_fp8
from moelink.kernels.triton_fp8 import triton_fp8_linear, triton_per_token_group_quant
from moelink.kernels.triton_moe_fp8 import triton_fused_moe_fp8

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

# name: (G global experts, E local, K top-k, D, I)
SHAPES = {"deepseek-v3": (256, 32, 8, 7168, 2048), "qwen3-30b-a3b": (128, 128, 8, 2048, 768)}


@contextlib.contextmanager
def no_host_sync():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def quantized_experts(E, N, K, gen, dev):
    """[E, N, K] fp8 weights + block scales, quantized one expert at a time (fp32 copies of all would not fit)."""
    wq = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device=dev)
    ws = torch.empty(E, -(-N // 128), -(-K // 128), device=dev)
    for e in range(E):
        wq[e], ws[e] = block_quantize(torch.randn(N, K, generator=gen, device=dev) / K**0.5)
    return wq, ws


def _moe_case(shape: str, T: int, seed: int):
    """A model shape's quantized experts, T tokens' bf16 activations, their top-k routing and (with fewer local
    experts than global ones) a random expert map, on the GPU."""
    G, E, K, D, I = SHAPES[shape]
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(seed)
    w13q, w13s = quantized_experts(E, 2 * I, D, gen, dev)
    w2q, w2s = quantized_experts(E, D, I, gen, dev)
    x = torch.randn(T, D, generator=gen, device=dev).to(torch.bfloat16)
    tw, ti = torch.topk(torch.softmax(torch.randn(T, G, generator=gen, device=dev), -1), K, dim=-1)
    emap = None
    if E < G:
        emap = torch.full((G,), -1, dtype=torch.int32, device=dev)
        emap[torch.randperm(G, generator=gen, device=dev)[:E]] = torch.arange(E, dtype=torch.int32, device=dev)
    return x, w13q, w13s, w2q, w2s, tw, ti, emap


@pytest.mark.parametrize("combine", ["sum", "atomic"])
@pytest.mark.parametrize("T", [1, 64, 2048])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_moe_fp8_at_model_shapes(shape, T, combine):
    x, w13q, w13s, w2q, w2s, tw, ti, emap = _moe_case(shape, T, seed=T)
    with no_host_sync():
        got = triton_fused_moe_fp8(x, w13q, w13s, w2q, w2s, tw, ti, emap, combine=combine)
    want = reference_fused_moe_fp8(x.float(), w13q, w13s, w2q, w2s, tw, ti, emap)
    assert torch.isfinite(got).all()
    err = float((got.float() - want).norm() / want.norm())
    assert err < 1e-2, f"{shape} T={T} {combine}: relative error {err:.3g}"


@pytest.mark.parametrize("T,N,K", [(1, 24576, 1536), (64, 7168, 16384), (2048, 4096, 7168)])
def test_fp8_linear_and_quant_at_deepseek_shapes(T, N, K):
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(T)
    x = torch.randn(T, K, generator=gen, device=dev).to(torch.bfloat16)
    wq, ws = block_quantize(torch.randn(N, K, generator=gen, device=dev) / K**0.5)
    with no_host_sync():
        q, s = triton_per_token_group_quant(x)
        got = triton_fp8_linear(x, wq, ws)
    want_q, want_s = per_token_group_quant(x)
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))  # nearest even
    want = reference_fp8_linear(x.float(), wq, ws)
    err = float((got.float() - want).norm() / want.norm())
    assert err < 5e-3, f"T={T} N={N} K={K}: relative error {err:.3g}"


@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_moe_fp8_tiny_at_model_shapes(shape, T):
    """The e4m3 tiny GEMVs (kernels/triton_moe_fp8_tiny.py, DEFAULT_TINY_FP8) compiled at the FP8 checkpoints'
    shapes: against the reference as the sorted path is, and under a CUDA graph: replay = eager bit for bit (one
    fixed summation order, no atomics)."""
    x, w13q, w13s, w2q, w2s, tw, ti, emap = _moe_case(shape, T, seed=100 + T)
    args = (x, w13q, w13s, w2q, w2s, tw, ti, emap)
    with no_host_sync():
        eager = triton_fused_moe_fp8(*args, path="tiny")
    want = reference_fused_moe_fp8(x.float(), w13q, w13s, w2q, w2s, tw, ti, emap)
    assert torch.isfinite(eager).all()
    err = float((eager.float() - want).norm() / want.norm())
    assert err < 1e-2, f"{shape} T={T} tiny: relative error {err:.3g}"
    out = torch.empty_like(eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_fused_moe_fp8(*args, out=out, path="tiny")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), f"{shape} T={T}: graph replay differs from eager"
    if T == 1:
        _two_launch_form_is_bit_exact(shape, args)


def _two_launch_form_is_bit_exact(shape, args):
    """Issue 80's two-launch form on the GPU: x quantized by the norm's program (add_rms_norm_fp8) and h by the
    gate-up GEMV's last program of each group (atomics across programs: what the interpreter, one program at a
    time, cannot race) give the four-launch form's bits, eagerly and in a CUDA graph replayed twice (the group
    counters reset themselves)."""
    from moelink.kernels.triton_norm import triton_add_rms_norm, triton_add_rms_norm_fp8

    x = args[0]
    zeros, ones = torch.zeros_like(x), torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    y, _, xq, xs = triton_add_rms_norm_fp8(x, zeros, ones, 1e-6)
    assert torch.equal(y, triton_add_rms_norm(x, zeros, ones, 1e-6)[0])
    q, s = triton_per_token_group_quant(y)
    assert torch.equal(xq.view(torch.uint8), q.view(torch.uint8)) and torch.equal(xs, s), shape
    rest = args[1:]
    with no_host_sync():
        apart = triton_fused_moe_fp8(y, *rest, path="tiny", fuse_h=False)
        two = triton_fused_moe_fp8(y, *rest, path="tiny", x_fp8=(xq, xs))
    assert torch.equal(two, apart), f"{shape}: the two-launch form moved bits"
    out = torch.empty_like(two)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_fused_moe_fp8(y, *rest, out=out, path="tiny", x_fp8=(xq, xs))
    for _ in range(2):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, two), f"{shape}: the two-launch form's graph replay differs"
