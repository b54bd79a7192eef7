"""The tiny-batch fused MoE (kernels/triton_moe_tiny.py) compiled on a GPU at model shapes: against a float32
per-expert oracle, with no host sync, under a CUDA graph (replay = eager, bit for bit: one fixed summation order),
with an EP-style expert map. Skipped without CUDA; `pytest -m gpu tests/kernels/test_triton_moe_tiny_gpu.py`."""
from __future__ import annotations

import math
import os

import pytest
import torch

from moelink.kernels.triton_moe import triton_fused_moe

from tests.kernels.test_triton_gpu import oracle_moe, no_host_sync

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels only")]

# (E, K, D, I): the moe_kernels shapes and DeepSeek-V2-Lite's routed experts.
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral-8x7b": (8, 2, 4096, 14336),
          "deepseek-v3": (256, 8, 7168, 2048), "deepseek-v2-lite": (64, 6, 2048, 1408)}


def _case(E, K, D, I, T, dtype, gen, local=None):
    dev = torch.device("cuda")
    G, E = E, local or E
    x = torch.randn(T, D, generator=gen, device=dev).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=gen, device=dev) / math.sqrt(D)).to(dtype)
    w2 = (torch.randn(E, D, I, generator=gen, device=dev) / math.sqrt(I)).to(dtype)
    tw, ti = torch.topk(torch.softmax(torch.randn(T, G, generator=gen, device=dev), -1), K, dim=-1)
    emap = None
    if local:
        emap = torch.full((G,), -1, dtype=torch.int32, device=dev)
        emap[torch.randperm(G, generator=gen, device=dev)[:E]] = torch.arange(E, dtype=torch.int32, device=dev)
    return x, w13, w2, tw, ti, emap


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("name", list(SHAPES))
def test_tiny_real_shapes_bf16(name, T):
    gen = torch.Generator(device="cuda").manual_seed(T)
    x, w13, w2, tw, ti, _ = _case(*SHAPES[name], T, torch.bfloat16, gen)
    out = torch.full_like(x, float("nan"))
    with no_host_sync(x.device):
        triton_fused_moe(x, w13, w2, tw, ti, out=out, path="tiny")
    want = oracle_moe(x, w13, w2, tw, ti)
    err = float((out.float() - want).norm() / want.norm())
    assert torch.isfinite(out).all() and err < 1e-2, f"{name} T={T}: relative error {err:.3g}"


def test_tiny_variants_fp32_and_expert_map():
    gen = torch.Generator(device="cuda").manual_seed(7)
    x, w13, w2, tw, ti, _ = _case(*SHAPES["qwen3-30b-a3b"], 2, torch.float32, gen)
    got = triton_fused_moe(x, w13, w2, tw, ti, path="tiny")
    want = oracle_moe(x, w13, w2, tw, ti)
    assert float((got - want).norm() / want.norm()) < 1e-5
    x, w13, w2, tw, ti, emap = _case(*SHAPES["deepseek-v3"], 4, torch.bfloat16, gen, local=32)  # an EP-8 rank
    got = triton_fused_moe(x, w13, w2, tw, ti, emap, path="tiny")
    want = oracle_moe(x, w13, w2, tw, ti, emap)
    assert float((got.float() - want).norm() / want.norm().clamp_min(1e-30)) < 1e-2


def test_tiny_under_a_cuda_graph_equals_eager_bit_for_bit():
    gen = torch.Generator(device="cuda").manual_seed(3)
    x, w13, w2, tw, ti, _ = _case(*SHAPES["qwen3-30b-a3b"], 4, torch.bfloat16, gen)
    eager = triton_fused_moe(x, w13, w2, tw, ti, path="tiny").clone()
    out = torch.empty_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        triton_fused_moe(x, w13, w2, tw, ti, out=out, path="tiny")  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        triton_fused_moe(x, w13, w2, tw, ti, out=out, path="tiny")
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
