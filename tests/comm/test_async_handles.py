"""dispatch_async / combine_async on real ranks (gloo processes, EP 2 and 3): with two dispatches in flight and
work issued between each start and its wait, the results equal the blocking calls' bit for bit, and those
equal one process over all experts; a handle waited twice, or before one issued earlier, is an error. (The nccl backend's stream-and-event
handles are a GPU test: tests/comm/test_nccl_gpu.py.)"""
from __future__ import annotations

import pytest
import torch

from moelink.comm import make_all_to_all
from moelink.comm.a2a_base import DoneHandle, PendingHandle
from moelink.kernels.moe import reference_fused_moe
from moelink.moe.placement import ExpertPlacement

HIDDEN, INTER = 16, 8
BACKENDS = ("torch", "torch_padded")
# name: (placement kwargs, tokens per rank, top-k)
CASES = {
    2: {"e4k2_rank1_empty": (dict(num_experts=4, ep_size=2), [5, 0], 2),
        "e5k3_replica": (dict(num_experts=5, ep_size=2, replicas=[0]), [7, 4], 3)},
    3: {"e6k2_uneven": (dict(num_experts=6, ep_size=3), [6, 1, 3], 2),
        "e7k3_redundant": (dict(num_experts=7, ep_size=3, num_redundant=2), [4, 0, 9], 3)},
}


def _scenarios(world_size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for name, (pkw, tokens, top_k) in CASES[world_size].items():
        G = pkw["num_experts"]
        w13 = torch.randn(G, 2 * INTER, HIDDEN, generator=g, dtype=torch.float64) / HIDDEN**0.5
        w2 = torch.randn(G, HIDDEN, INTER, generator=g, dtype=torch.float64) / INTER**0.5
        xs = [torch.randn(T, HIDDEN, generator=g, dtype=torch.float64) for T in tokens]
        ids = [torch.stack([torch.randperm(G, generator=g)[:top_k] for _ in range(T)]) if T
               else torch.zeros(0, top_k, dtype=torch.long) for T in tokens]
        ws = [torch.softmax(torch.randn(T, top_k, generator=g, dtype=torch.float64), -1) for T in tokens]
        for backend in BACKENDS:
            options = dict(max_tokens_per_rank=max(tokens)) if backend == "torch_padded" else {}
            out.append(dict(name=f"{name}/{backend}", backend=backend, options=options, compute="moe",
                            placement=pkw, x=xs, ids=ids, weights=ws, w13=w13, w2=w2))
    return out


@pytest.fixture(scope="module")
def launched(ep_launch):
    sc2, sc3 = _scenarios(2, seed=0), _scenarios(3, seed=1)
    res2, res3 = ep_launch(dict(world_size=2, scenarios=sc2, mode="async"),
                           dict(world_size=3, scenarios=sc3, mode="async"))
    return {2: (res2, sc2), 3: (res3, sc3)}


@pytest.mark.parametrize("world_size", [2, 3])
def test_async_equals_blocking_with_work_in_between(launched, world_size):
    results, scenarios = launched[world_size]
    for sc in scenarios:
        for rank in range(world_size):
            res = results[rank][sc["name"]]
            assert res["handle"] == "PendingHandle", sc["name"]  # a real transfer in flight, not a done handle
            for i, ((recv_b, ids_b, out_b), (recv_a, ids_a, out_a)) in enumerate(zip(res["blocking"], res["got"])):
                where = f"{sc['name']} rank {rank} dispatch {i}"
                assert torch.equal(recv_a, recv_b) and torch.equal(ids_a, ids_b), where
                assert torch.equal(out_a, out_b), where
                x = sc["x"][rank] * (i + 1)
                want = reference_fused_moe(x, sc["w13"], sc["w2"], sc["weights"][rank], sc["ids"][rank])
                torch.testing.assert_close(out_a, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{where}: {m}")
            want = reference_fused_moe(3 * sc["x"][rank], sc["w13"], sc["w2"], sc["weights"][rank], sc["ids"][rank])
            torch.testing.assert_close(res["between"], want, rtol=1e-12, atol=1e-12)


def test_handle_waited_twice_is_an_error(launched):
    for results, scenarios in launched.values():
        for rank_results in results:
            for sc in scenarios:
                assert "waited on twice" in rank_results[sc["name"]]["twice"]


def test_one_rank_handles():
    # The base-class default (a done handle) and the padded backend's own at world size 1 (a plain copy).
    placement = ExpertPlacement(num_experts=4, ep_size=1)
    x = torch.randn(3, 8, dtype=torch.float64)
    ids, w = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.full((3, 2), 0.5, dtype=torch.float64)
    for name, options, kind in (("none", {}, DoneHandle), ("torch_padded", dict(max_tokens_per_rank=3), PendingHandle)):
        a2a = make_all_to_all(name, None, 0, 1, "cpu", **options)
        handle = a2a.dispatch_async(x, ids, w, placement.to_tensors("cpu"))
        assert isinstance(handle, kind)
        recv_x, meta = handle.wait()
        with pytest.raises(RuntimeError, match="waited on twice"):
            handle.wait()
        out = a2a.combine_async(recv_x, meta).wait()
        # y = x on every received row: each token comes back once (one rank serves all its experts).
        torch.testing.assert_close(out, x, rtol=0, atol=0)


@pytest.mark.parametrize("name, options", [("none", {}), ("torch_padded", dict(max_tokens_per_rank=3))])
def test_handles_are_waited_in_issue_order(name, options):
    placement = ExpertPlacement(num_experts=4, ep_size=1)
    tables = placement.to_tensors("cpu")
    x = torch.randn(3, 8, dtype=torch.float64)
    ids, w = torch.tensor([[0, 1], [2, 3], [1, 2]]), torch.full((3, 2), 0.5, dtype=torch.float64)
    a2a = make_all_to_all(name, None, 0, 1, "cpu", **options)
    first, second = a2a.dispatch_async(x, ids, w, tables), a2a.dispatch_async(2 * x, ids, w, tables)
    with pytest.raises(RuntimeError, match=r"handle #1 waited out of order: handle #0"):
        second.wait()
    # The refused wait left the second handle waitable: in order, both complete.
    (recv_1, _), (recv_2, _) = first.wait(), second.wait()
    assert torch.equal(recv_2, 2 * recv_1)
    # Blocking calls in between are issued and waited at once: they never stand in the way.
    later = a2a.dispatch_async(x, ids, w, tables)
    a2a.dispatch(x, ids, w, tables)
    assert torch.equal(later.wait()[0], recv_1)
