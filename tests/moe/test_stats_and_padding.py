"""Expert counters (moe/stats.py) and the padding-row mask of the MoE layer (used by decode graphs)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from moelink.kernels.moe import reference_fused_moe
from moelink.kernels.ops import ReferenceKernels
from moelink.moe.layer import MoELayer
from moelink.moe.router import SoftmaxTopKRouter
from moelink.moe.stats import MoEStats


def test_counts_skip_negative_ids_and_reset_clears_everything():
    stats = MoEStats(num_moe_layers=2, num_experts=5, device=torch.device("cpu"))
    stats.record_routing(0, torch.tensor([[0, 3], [3, -1], [-1, -1]]))
    stats.record_routing(1, torch.tensor([[4, 4]]))
    stats.record_transfer(0, _meta(sent=[2, 1], recv=[1, 3], row_bytes=10, wire_rows=8))
    stats.add_times(0.1, 0.2, 0.3)
    assert stats.counts_LG.tolist() == [[1, 0, 0, 2, 0], [0, 0, 0, 0, 2]]
    stats.reset()
    snap = stats.snapshot()
    assert not snap.tokens_per_expert.any() and snap.bytes_dispatched == 0 and snap.bytes_combined == 0
    assert snap.tokens_dispatched == 0 and snap.dispatch_s == snap.compute_s == snap.combine_s == 0.0
    # snapshot resets too: counts read once per step, then zero.
    stats.record_routing(0, torch.tensor([[2, 1]]))
    assert np.array_equal(stats.snapshot().tokens_per_expert[0], [0, 1, 1, 0, 0])
    assert not stats.counts_LG.any()


def _meta(sent, recv, row_bytes, wire_rows):
    """The DispatchMeta fields record_transfer reads (device counts, host-known sizes)."""
    from types import SimpleNamespace

    return SimpleNamespace(send_counts_R=torch.tensor(sent), recv_counts_R=torch.tensor(recv), row_bytes=row_bytes,
                           wire_rows=wire_rows, recv_topk_ids_NK=torch.full((0, 1), -1), inter_node_rows=None)


def test_transfer_counters_stay_on_the_device_until_the_snapshot():
    stats = MoEStats(num_moe_layers=2, num_experts=3, device=torch.device("cpu"))
    stats.record_transfer(0, _meta(sent=[2, 1], recv=[1, 3], row_bytes=10, wire_rows=8))
    stats.record_transfer(1, _meta(sent=[0, 5], recv=[2, 2], row_bytes=10, wire_rows=8))
    stats.record_transfer(1, _meta(sent=[1, 0], recv=[0, 0], row_bytes=10, wire_rows=4))
    assert stats.xfer_LC.device.type == "cpu" and stats.xfer_LC.dtype == torch.int64
    snap = stats.snapshot()
    assert (snap.tokens_dispatched, snap.rows_received, snap.wire_rows) == (3 + 5 + 1, 4 + 4, 20)
    assert (snap.bytes_dispatched, snap.bytes_combined, snap.wire_bytes) == (90, 80, 200)
    assert snap.per_layer_bytes == [30, 60]
    assert not stats.xfer_LC.any()  # read once, then zero


def _layer(stats, E=6, K=2, D=16, I=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = MoELayer(D, I, E, SoftmaxTopKRouter(K, True), ReferenceKernels(), torch.float64, stats=stats)
    with torch.no_grad():
        for p in (layer.gate_GD, layer.w13_EFD, layer.w2_EDI):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    return layer


def test_masked_rows_reach_no_expert_and_count_nothing():
    stats = MoEStats(1, 6, torch.device("cpu"))
    layer = _layer(stats)
    x_TD = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want_TD = layer(x_TD[:3])
    want_counts = stats.snapshot().tokens_per_expert
    layer.valid_rows_T = torch.tensor([True, True, True, False, False])
    got_TD = layer(x_TD)
    # Equal to rounding: the reference picks its path by the batch's pair count (kernels/moe.py: experts' weights
    # gathered at <= 8 pairs, padded or per expert past that), and the paths round differently; bitwise equality
    # whatever the batch is the batch-invariant mode's (tests/kernels/test_batch_invariant.py).
    assert torch.allclose(got_TD[:3], want_TD, rtol=1e-12, atol=1e-12) and not got_TD[3:].any()
    assert np.array_equal(stats.snapshot().tokens_per_expert, want_counts)


def test_reference_moe_with_a_map_keeps_minus_one_as_no_expert():
    """-1 ids (padding, or 'not here') must not index the expert map, where -1 would wrap to its last entry."""
    g = torch.Generator().manual_seed(2)
    E, G, K, D, I = 3, 5, 2, 8, 4
    x = torch.randn(4, D, generator=g, dtype=torch.float64)
    w13 = torch.randn(E, 2 * I, D, generator=g, dtype=torch.float64)
    w2 = torch.randn(E, D, I, generator=g, dtype=torch.float64)
    emap = torch.tensor([0, -1, 1, -1, 2], dtype=torch.int32)  # global 4 is local 2: what -1 would wrap to
    ids = torch.tensor([[4, -1], [-1, -1], [0, 2], [-1, 4]])
    w = torch.rand(4, K, generator=g, dtype=torch.float64)
    out = reference_fused_moe(x, w13, w2, w, ids, emap)
    assert not out[1].any()
    only_real = reference_fused_moe(x, w13, w2, w * (ids >= 0), ids.clamp(min=0), emap)
    assert torch.allclose(out, only_real)


def test_set_valid_rows_under_expert_parallelism_needs_a_padding_aware_all_to_all(tiny_model):
    """Padding rows (ids -1) dispatch only on the fixed-capacity backends; the counted ones would look -1 up."""
    from types import SimpleNamespace

    from moelink.comm import make_all_to_all
    from moelink.engine.config.model import ModelConfig
    from moelink.engine.models.registry import ARCHITECTURES, MoEDecoderForCausalLM

    cfg = ModelConfig.from_pretrained(tiny_model("qwen3_e6k3"), "float32", None)
    model = MoEDecoderForCausalLM(cfg, ARCHITECTURES[cfg.architecture], ReferenceKernels(), torch.device("cpu"))
    model.set_valid_rows(torch.ones(2, dtype=torch.bool))
    model.set_valid_rows(None)
    counted = SimpleNamespace(all_to_all=make_all_to_all("none", None, 0, 1, "cpu"))
    padded = SimpleNamespace(all_to_all=make_all_to_all("torch_padded", None, 0, 1, "cpu", max_tokens_per_rank=4))
    sparse = [layer for layer in model.layers if layer.is_sparse]
    for layer in sparse:
        layer.mlp.ep = counted  # what an expert-parallel rank's layers hold
    with pytest.raises(ValueError, match="expert parallelism with this all-to-all"):
        model.set_valid_rows(torch.ones(2, dtype=torch.bool))
    for layer in sparse:
        layer.mlp.ep = padded
    model.set_valid_rows(torch.ones(2, dtype=torch.bool))
    assert all(layer.mlp.valid_rows_T is not None for layer in sparse)
