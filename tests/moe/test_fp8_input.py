"""The FP8 experts' input quantized by the norm before them (moe/fp8_input.py, engine/models/blocks/stream.py
`ffn_prenorm`), on the CPU references: the layer's output is bit for bit the one where the experts quantize x
themselves, the experts are handed the norm's copy exactly when they run on that x, and a handoff is never read
twice or for another tensor. (The Triton forms of both ops are tested in tests/kernels/test_triton_fp8_prequant.py;
on CUDA the layer makes the handoff itself: `MoELayer.fp8_input`.)"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from moelink.engine.models.blocks.stream import ffn_prenorm
from moelink.engine.models.layers import RMSNorm
from moelink.kernels.fp8 import block_quantize
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.expert_weights import Fp8BlockExperts
from moelink.moe.fp8_input import Fp8Input
from moelink.moe.layer import MoELayer
from moelink.moe.router import SoftmaxTopKRouter

T, D, I, G, TOP_K, BLOCK = 5, 48, 32, 6, 2, (16, 16)


def _layer(kernels) -> MoELayer:
    g = torch.Generator().manual_seed(3)
    layer = MoELayer(D, I, G, SoftmaxTopKRouter(TOP_K, True), kernels, torch.bfloat16,
                     expert_format=Fp8BlockExperts(BLOCK, stacked=True))
    (q13, s13), (q2, s2) = (block_quantize(torch.randn(G, 2 * I, D, generator=g) / D**0.5, BLOCK),
                            block_quantize(torch.randn(G, D, I, generator=g) / I**0.5, BLOCK))
    for name, t in dict(w13_EFD=q13, w13_scale_inv_EFD=s13, w2_EDI=q2, w2_scale_inv_EDI=s2,
                        gate_GD=torch.randn(G, D, generator=g).bfloat16()).items():
        getattr(layer, name).data.copy_(t)
    return layer


def test_norm_quantized_input_changes_no_bit(monkeypatch):
    kernels = ReferenceKernels()
    layer = _layer(kernels)
    assert layer.fp8_input is None  # the references: no handoff unless asked (the Triton kernels on CUDA make one)
    g = torch.Generator().manual_seed(4)
    x, res = torch.randn(T, D, generator=g).bfloat16(), torch.randn(T, D, generator=g).bfloat16()
    norm = RMSNorm(D, 1e-6, kernels, torch.bfloat16)
    norm.weight.data.copy_(1 + 0.1 * torch.randn(D, generator=g))
    block = SimpleNamespace(moe=layer)
    h_plain, r_plain = ffn_prenorm(norm, block, x, res)
    plain = layer(h_plain)

    seen = []
    fused_moe_fp8 = kernels.fused_moe_fp8
    monkeypatch.setattr(kernels, "fused_moe_fp8", lambda *a, **k: seen.append(k.get("x_fp8")) or fused_moe_fp8(*a, **k))
    layer.fp8_input = Fp8Input(BLOCK[1])
    h, r = ffn_prenorm(norm, block, x, res)
    assert torch.equal(h, h_plain) and torch.equal(r, r_plain)
    assert torch.equal(layer(h), plain)
    assert seen[-1] is not None and seen[-1][0].dtype == torch.float8_e4m3fn and seen[-1][1].shape == (T, D // 16)
    assert layer(h) is not None and seen[-1] is None  # read once: the next run quantizes x itself
    ffn_prenorm(norm, block, x, res)
    layer(h.clone())  # another tensor than the one handed over (sliced or dispatched rows): not the norm's copy
    assert seen[-1] is None
    layer.fp8_input = Fp8Input(BLOCK[1], max_tokens=T - 1)  # the threshold is data: above it, no copy is made
    assert layer.fp8_input_for(T) is None and layer.fp8_input_for(T - 1) is layer.fp8_input
