"""The ExpertLoad RPC's online-EPLB fields: the current per-layer placement and the EPLB counters."""
from __future__ import annotations

from moelink.engine.core.moe_metrics import ExpertLoadReport
from moelink.engine.server.gen import moelink_v1_pb2 as pb
from moelink.engine.server.native import _eplb_fields


def _report(**kw):
    return ExpertLoadReport(moe_layers=(1, 2), num_experts=4, top_k=2, world_size=2,
                            experts_on_ranks=((0, 1), (2, 3)), tokens_per_expert_LG=((1, 2, 3, 4), (4, 3, 2, 1)),
                            bytes_dispatched=10, bytes_combined=10, steps=3, **kw)


def test_eplb_fields_round_trip():
    assert _eplb_fields(_report()) == {}  # EPLB off: the response has none of them
    placement = (((0, 1, 3), (2, 3)), ((0, 2), (1, 3, 0)))
    eplb = dict(rebalances=2, bytes_moved=4096, predicted_imbalance_before=1.8, predicted_imbalance_after=1.05)
    r = pb.ExpertLoadResponse(steps=3, **_eplb_fields(_report(experts_on_ranks_per_layer=placement, eplb=eplb)))
    r = pb.ExpertLoadResponse.FromString(r.SerializeToString())
    assert [[list(x.experts) for x in layer.experts_on_ranks] for layer in r.placement_per_layer] == \
        [[list(h) for h in layer] for layer in placement]
    assert (r.eplb_rebalances, r.eplb_bytes_moved) == (2, 4096)
    assert abs(r.eplb_imbalance_before - 1.8) < 1e-12 and abs(r.eplb_imbalance_after - 1.05) < 1e-12
