"""MXFP4 blocks permuted once after load into the Triton decode's pair order (MoELayer.process_weights_after_loading,
kernels/mxfp4.to_pair_order): only where the kernels' MXFP4 op reads that order (its `pair_order` keyword), only
what a load or a weight update wrote, only where the plan writes the blocks whole (gpt-oss's fused plan), and the
experts then called with `pair_order=True`: the layer's output is the reference's on the checkpoint's layout, bit
for bit. (The Triton paths on the permuted blocks:
tests/kernels/test_mxfp4_pair_order.py.)"""
from __future__ import annotations

import torch

from moelink.kernels.mxfp4 import from_pair_order, mxfp4_quantize, reference_fused_moe_mxfp4
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.expert_weights import Mxfp4Experts
from moelink.moe.layer import MoELayer, takes_pair_order
from moelink.moe.router import SoftmaxTopKRouter

T, D, I, G, TOP_K = 5, 64, 32, 6, 2


class PairKernels(ReferenceKernels):
    """The references, with an MXFP4 op that takes `pair_order` as the Triton one does (it undoes the order and
    runs the reference), counting how it was called."""

    def __init__(self):
        super().__init__()
        self.calls: list[bool] = []
        self.fused_moe_mxfp4 = self._mxfp4  # (the backend sets its ops on the instance)

    def _mxfp4(self, x, w13q, w13s, w2q, w2s, weights, ids, emap=None, *, pair_order=False, **kw):
        self.calls.append(pair_order)
        if pair_order:
            w13q, w2q = from_pair_order(w13q), from_pair_order(w2q)
        return reference_fused_moe_mxfp4(x, w13q, w13s, w2q, w2s, weights, ids, emap, **kw)


def _layer(kernels) -> tuple[MoELayer, dict]:
    g = torch.Generator().manual_seed(5)
    layer = MoELayer(D, I, G, SoftmaxTopKRouter(TOP_K, True), kernels, torch.float32, expert_format=Mxfp4Experts())
    (q13, s13), (q2, s2) = (mxfp4_quantize(torch.randn(G, 2 * I, D, generator=g)),
                            mxfp4_quantize(torch.randn(G, D, I, generator=g)))
    loaded = dict(w13_blocks_EFSQ=q13, w13_scales_EFS=s13, w2_blocks_EDSQ=q2, w2_scales_EDS=s2,
                  gate_GD=torch.randn(G, D, generator=g))
    plan = layer.expert_format.weight_plan(layer, "mlp.", True, list(range(G)), (), ("gate", "up", "down"))
    assert layer.expert_format.whole_blocks and plan["mlp.experts.gate_up_proj_blocks"].dest is layer.w13_blocks_EFSQ
    for name, t in loaded.items():
        getattr(layer, name).data.copy_(t)
    return layer, loaded


def test_blocks_permuted_after_load_where_the_kernels_read_pair_order():
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(6))
    plain, loaded = _layer(ReferenceKernels())
    assert not takes_pair_order(plain.kernels)
    plain.process_weights_after_loading()
    assert not plain.mxfp4_pair_order and torch.equal(plain.w13_blocks_EFSQ, loaded["w13_blocks_EFSQ"])
    want = plain(x)

    kernels = PairKernels()
    layer, _ = _layer(kernels)
    assert takes_pair_order(kernels)
    layer.process_weights_after_loading()
    assert layer.mxfp4_pair_order and not torch.equal(layer.w13_blocks_EFSQ, loaded["w13_blocks_EFSQ"])
    assert torch.equal(from_pair_order(layer.w2_blocks_EDSQ), loaded["w2_blocks_EDSQ"])
    assert torch.equal(layer(x), want) and kernels.calls == [True]

    # A weight update that wrote w2's blocks (checkpoint layout) alone: only those are permuted again.
    layer.w2_blocks_EDSQ.data.copy_(loaded["w2_blocks_EDSQ"])
    layer.process_weights_after_loading({id(layer.w2_blocks_EDSQ)})
    assert torch.equal(from_pair_order(layer.w13_blocks_EFSQ), loaded["w13_blocks_EFSQ"])
    assert torch.equal(from_pair_order(layer.w2_blocks_EDSQ), loaded["w2_blocks_EDSQ"])
    assert torch.equal(layer(x), want)

    # The per-expert plan writes views of the blocks (an update's ids would not name them): published order kept.
    per_expert, _ = _layer(PairKernels())
    per_expert.expert_format.weight_plan(per_expert, "mlp.", False, list(range(G)), (), ("gate", "up", "down"))
    per_expert.process_weights_after_loading()
    assert not per_expert.mxfp4_pair_order and torch.equal(per_expert.w13_blocks_EFSQ, loaded["w13_blocks_EFSQ"])
