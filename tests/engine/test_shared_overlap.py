"""Routed + shared experts (SharedExpertsMoE): under expert parallelism the shared MLP runs while the dispatch is
in flight (between dispatch_async and its wait), and the output is the routed + shared sum it always was."""
from __future__ import annotations

import torch

from moelink.comm.a2a_base import A2AHandle
from moelink.comm.all_to_all import NoAllToAll
from moelink.engine.models.layers import DenseMLP
from moelink.engine.models.moe_decoder import SharedExpertsMoE
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import ExpertParallel, MoELayer
from moelink.moe.placement import ExpertPlacement
from moelink.moe.router import SoftmaxTopKRouter

D, I, G, K = 16, 8, 6, 2


class _LoggedHandle(A2AHandle):
    def __init__(self, inner, log, what):
        self.inner, self.log, self.what = inner, log, what

    def _finish(self):
        self.log.append(f"{self.what} wait")
        return self.inner.wait()


class _LoggedAllToAll(NoAllToAll):
    """World size 1 with the async calls logged: what ran between each start and its wait."""

    def __init__(self, log):
        super().__init__(None, 0, 1, "cpu")
        self.log = log

    def dispatch_async(self, *args):
        self.log.append("dispatch start")
        return _LoggedHandle(super().dispatch_async(*args), self.log, "dispatch")

    def combine_async(self, *args):
        self.log.append("combine start")
        return _LoggedHandle(super().combine_async(*args), self.log, "combine")


def _layers(ep):
    g = torch.Generator().manual_seed(0)
    routed = MoELayer(D, I, G, SoftmaxTopKRouter(K, True), ReferenceKernels(), torch.float64, ep=ep)
    shared = DenseMLP(D, 2 * I, torch.float64, kernels=ReferenceKernels())
    for p in list(routed.parameters()) + list(shared.parameters()):
        p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / p.shape[-1] ** 0.5)
    return routed, shared


@torch.inference_mode()
def test_shared_experts_run_during_the_dispatch():
    log = []
    placement = ExpertPlacement(num_experts=G, ep_size=1)
    ep = ExpertParallel(0, 1, placement, _LoggedAllToAll(log), placement.to_tensors("cpu"))
    routed, shared = _layers(ep)
    shared.register_forward_hook(lambda *_: log.append("shared"))
    x_TD = torch.randn(5, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out_TD = SharedExpertsMoE(routed, shared)(x_TD)
    assert log == ["dispatch start", "shared", "dispatch wait", "combine start", "combine wait"]
    # Without expert parallelism (no all-to-all, nothing to overlap): the same sum, to the bit.
    plain_routed, plain_shared = _layers(None)
    assert torch.equal(out_TD, plain_routed(x_TD) + plain_shared(x_TD))
