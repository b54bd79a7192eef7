"""All-to-all in one process: world size 1 backends, replica choice, backend selection and argument errors.

(Multi-rank behaviour is in test_dispatch_layout.py and test_ep_equivalence.py.)
"""
from __future__ import annotations

import pytest
import torch

from moelink.comm import DispatchMeta, make_all_to_all
from moelink.kernels.moe import reference_fused_moe
from moelink.moe.placement import ExpertPlacement, select_replicas


def _moe_inputs(T=9, G=6, K=3, D=16, I=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(G, generator=g)[:K] for _ in range(T)]) if T else torch.zeros(0, K, dtype=torch.long)
    w = torch.softmax(torch.randn(T, K, generator=g, dtype=torch.float64), -1)
    w13 = torch.randn(G, 2 * I, D, generator=g, dtype=torch.float64)
    w2 = torch.randn(G, D, I, generator=g, dtype=torch.float64)
    return x, ids, w, w13, w2


@pytest.mark.parametrize("backend, options", [("none", {}), ("torch_padded", dict(max_tokens_per_rank=12))])
@pytest.mark.parametrize("T", [9, 0])
def test_world_size_one_matches_reference(backend, options, T):
    x, ids, w, w13, w2 = _moe_inputs(T=T)
    placement = ExpertPlacement(num_experts=6, ep_size=1)
    a2a = make_all_to_all(backend, None, 0, 1, "cpu", **options)
    recv_x, meta = a2a.dispatch(x, ids, w, placement.to_tensors("cpu"))
    if backend == "none":
        assert recv_x is x  # nothing moves at world size 1
        assert torch.equal(meta.recv_topk_ids_NK, ids.to(torch.int32))
    y = reference_fused_moe(recv_x, w13, w2, meta.recv_topk_weights_NK, meta.recv_topk_ids_NK)
    out = a2a.combine(y, meta)
    torch.testing.assert_close(out, reference_fused_moe(x, w13, w2, w, ids), rtol=1e-12, atol=1e-12)
    assert meta.num_tokens_sent == T and meta.num_tokens_received == T
    assert meta.bytes_dispatched == meta.bytes_combined == T * 16 * 8


def test_meta_is_returned_not_stashed():
    # Two dispatches in flight (e.g. two micro-batches), combined in reverse order.
    placement = ExpertPlacement(num_experts=6, ep_size=1)
    tables = placement.to_tensors("cpu")
    a2a = make_all_to_all("torch_padded", None, 0, 1, "cpu", max_tokens_per_rank=10)
    (xa, ia, wa, w13, w2), (xb, ib, wb, _, _) = _moe_inputs(T=7, seed=1), _moe_inputs(T=4, seed=2)
    ra, ma = a2a.dispatch(xa, ia, wa, tables)
    rb, mb = a2a.dispatch(xb, ib, wb, tables)
    out_b = a2a.combine(reference_fused_moe(rb, w13, w2, mb.recv_topk_weights_NK, mb.recv_topk_ids_NK), mb)
    out_a = a2a.combine(reference_fused_moe(ra, w13, w2, ma.recv_topk_weights_NK, ma.recv_topk_ids_NK), ma)
    torch.testing.assert_close(out_a, reference_fused_moe(xa, w13, w2, wa, ia), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out_b, reference_fused_moe(xb, w13, w2, wb, ib), rtol=1e-12, atol=1e-12)
    assert isinstance(ma, DispatchMeta) and not any(isinstance(v, DispatchMeta) for v in vars(a2a).values())


def test_replica_rule_token_plus_rank_mod_count():
    # 4 experts on 2 ranks (r0: 0, 1 | r1: 2, 3) plus a copy of expert 0 on rank 1 (its local slot 2).
    placement = ExpertPlacement(num_experts=4, ep_size=2, replicas=[0])
    assert placement.log2phy[0] == [(0, 0), (1, 2)]
    tables = placement.to_tensors("cpu")
    ids = torch.tensor([[0, 3], [0, 1], [0, 2], [1, 0]])
    # Sender rank 0: token t uses replica t % 2 of expert 0 → ranks 0, 1, 0, 1.
    dst, slot = select_replicas(ids, tables, rank=0)
    assert dst.tolist() == [[0, 1], [1, 0], [0, 1], [0, 1]]
    assert slot.tolist() == [[0, 1], [2, 1], [0, 0], [1, 2]]
    assert slot.dtype == torch.int32
    # Sender rank 1 shifts by one: ranks 1, 0, 1, 0.
    dst, slot = select_replicas(ids, tables, rank=1)
    assert dst[:, 0].tolist() == [1, 0, 1, 0] and dst[3].tolist() == [0, 0]
    assert slot[:, 0].tolist() == [2, 0, 2, 1]


def test_backend_selection_and_errors():
    assert make_all_to_all("auto", None, 0, 1, "cpu").name == "none"
    with pytest.raises(ValueError, match="'mpi'.*choose from"):
        make_all_to_all("mpi", None, 0, 1, "cpu")
    with pytest.raises(ValueError, match="world size 1"):
        make_all_to_all("none", None, 0, 2, "cpu")
    with pytest.raises(ValueError, match="process group"):
        make_all_to_all("torch", None, 0, 2, "cpu")
    with pytest.raises(ValueError, match="rank"):
        make_all_to_all("none", None, 1, 1, "cpu")
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        make_all_to_all("torch_padded", None, 0, 1, "cpu", max_tokens_per_rank=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_nccl_backend_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="needs a CUDA device.*use 'torch'"):
        make_all_to_all("nccl", None, 0, 1, "cpu", max_tokens_per_rank=8)


def test_nccl_library_missing_is_a_clear_error():
    from moelink.comm.nccl_all_to_all import NcclLibrary

    with pytest.raises(RuntimeError, match="nvidia-nccl-cu13"):
        NcclLibrary("/nonexistent/libnccl.so.2")


def test_bad_inputs_name_what_is_wrong():
    placement = ExpertPlacement(num_experts=4, ep_size=1)
    a2a = make_all_to_all("none", None, 0, 1, "cpu")
    x, ids, w = torch.zeros(3, 8), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="ep_size=2"):
        a2a.dispatch(x, ids, w, ExpertPlacement(num_experts=4, ep_size=2).to_tensors())
    with pytest.raises(ValueError, match="topk_ids_TK"):
        a2a.dispatch(x, ids[:2], w[:2], placement.to_tensors())
    with pytest.raises(ValueError, match="topk_weights_TK"):
        a2a.dispatch(x, ids, w[:, :1], placement.to_tensors())
    padded = make_all_to_all("torch_padded", None, 0, 1, "cpu", max_tokens_per_rank=2)
    with pytest.raises(ValueError, match="max_tokens_per_rank is 2"):
        padded.dispatch(x, ids, w, placement.to_tensors())
    _, meta = padded.dispatch(x[:2], ids[:2], w[:2], placement.to_tensors())
    with pytest.raises(ValueError, match="combine y_ND must have 2 rows"):
        padded.combine(torch.zeros(3, 8), meta)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("self_copy", [True, False])
@pytest.mark.parametrize("asynchronous", [False, True])
def test_nccl_world_size_one_and_cuda_graph(self_copy, asynchronous):
    """On one GPU: the ctypes NCCL path (self_copy=False sends the block to itself through ncclSend/ncclRecv),
    and dispatch → experts → combine captured in a CUDA graph and replayed on new inputs; `asynchronous`: the
    async calls (transfers on the communication stream, joined at wait()) with compute issued in between."""
    dev = torch.device("cuda", 0)
    x, ids, w, w13, w2 = (t.to(dev) for t in _moe_inputs(T=9))
    placement = ExpertPlacement(num_experts=6, ep_size=1)
    tables = placement.to_tensors(dev)
    a2a = make_all_to_all("nccl", None, 0, 1, dev, max_tokens_per_rank=16, self_copy=self_copy)
    graph = None
    try:
        want = reference_fused_moe(x, w13, w2, w, ids)

        def step(x_, ids_, w_):
            if asynchronous:
                handle = a2a.dispatch_async(x_, ids_, w_, tables)
                busy = x_ @ x_.T  # compute-stream work while the transfer runs on the communication stream
                recv, meta = handle.wait()
                recv = recv + 0 * busy.sum()
            else:
                recv, meta = a2a.dispatch(x_, ids_, w_, tables)
            # A graph-safe expert compute: dense over all (6) experts, masked by the routed weights.
            gate, up = torch.einsum("nd,efd->nef", recv, w13).chunk(2, dim=-1)
            h = torch.einsum("nei,edi->ned", torch.nn.functional.silu(gate) * up, w2)
            ids_l = meta.recv_topk_ids_NK.long()
            dense_w = torch.zeros(recv.shape[0], 6, dtype=recv.dtype, device=dev)
            dense_w.scatter_add_(1, ids_l.clamp(min=0), torch.where(ids_l >= 0, meta.recv_topk_weights_NK, 0))
            y = (h * dense_w[:, :, None]).sum(1)
            return a2a.combine_async(y, meta).wait() if asynchronous else a2a.combine(y, meta)

        torch.testing.assert_close(step(x, ids, w), want, rtol=1e-10, atol=1e-10)
        sx, sids, sw = x.clone(), ids.clone(), w.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(sx, sids, sw)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            out = step(sx, sids, sw)
        x2, ids2, w2_, _, _ = (t.to(dev) for t in _moe_inputs(T=9, seed=5))
        sx.copy_(x2), sids.copy_(ids2), sw.copy_(w2_)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, reference_fused_moe(x2, w13, w2, w2_, ids2), rtol=1e-10, atol=1e-10)
    finally:
        # A graph that captured NCCL work holds the communicator: ncclCommDestroy waits for it forever
        # (seen on an H100, NCCL 2.28.9), so the graph goes first.
        if graph is not None:
            graph.reset()
        a2a.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nccl_low_latency_mode_in_a_cuda_graph():
    """On one GPU: the NCCL backend as the engine runs it (TwoModeAllToAll), in the low-latency mode inside a
    captured graph: decode capacity 8, a batch of 6 with two padding rows (ids -1), the device transfer
    counters recorded in the graph too. Replayed on new inputs: outputs equal the reference over the real
    rows, padding rows are 0, and the counters read after the replay say 4 rows sent, 8 on the wire. A
    high-throughput step after it (other block size, eager) still runs."""
    from moelink.comm.ep_modes import HIGH_THROUGHPUT, LOW_LATENCY, TwoModeAllToAll
    from moelink.engine.contract.ep_step import EPStepPlan
    from moelink.moe.stats import MoEStats

    dev = torch.device("cuda", 0)
    placement = ExpertPlacement(num_experts=6, ep_size=1)
    tables = placement.to_tensors(dev)
    a2a = TwoModeAllToAll(make_all_to_all("nccl", None, 0, 1, dev, max_tokens_per_rank=32, self_copy=False), 8)
    stats = MoEStats(1, 6, dev)
    graph = None
    try:
        x, ids, w, w13, w2 = (t.to(dev) for t in _moe_inputs(T=6))
        ids[4:] = -1

        def step(x_, ids_, w_):
            recv, meta = a2a.dispatch(x_, ids_, w_, tables)
            gate, up = torch.einsum("nd,efd->nef", recv, w13).chunk(2, dim=-1)
            h = torch.einsum("nei,edi->ned", torch.nn.functional.silu(gate) * up, w2)
            ids_l = meta.recv_topk_ids_NK.long()
            dense_w = torch.zeros(recv.shape[0], 6, dtype=recv.dtype, device=dev)
            dense_w.scatter_add_(1, ids_l.clamp(min=0), torch.where(ids_l >= 0, meta.recv_topk_weights_NK, 0))
            stats.record_transfer(0, meta)
            return a2a.combine((h * dense_w[:, :, None]).sum(1), meta)

        a2a.begin_step(EPStepPlan(LOW_LATENCY, 6))
        sx, sids, sw = x.clone(), ids.clone(), w.clone()
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(sx, sids, sw)  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(sx, sids, sw)
        stats.reset()
        x2, ids2, w2_, _, _ = (t.to(dev) for t in _moe_inputs(T=6, seed=5))
        ids2[4:] = -1
        sx.copy_(x2), sids.copy_(ids2), sw.copy_(w2_)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out[:4], reference_fused_moe(x2[:4], w13, w2, w2_[:4], ids2[:4]),
                                   rtol=1e-10, atol=1e-10)
        assert not out[4:].any()
        snap = stats.snapshot()
        assert (snap.tokens_dispatched, snap.rows_received, snap.wire_rows) == (4, 4, 8)
        a2a.begin_step(EPStepPlan(HIGH_THROUGHPUT, 20))
        x3, ids3, w3, _, _ = (t.to(dev) for t in _moe_inputs(T=20, seed=6))
        torch.testing.assert_close(step(x3, ids3, w3), reference_fused_moe(x3, w13, w2, w3, ids3),
                                   rtol=1e-10, atol=1e-10)
    finally:
        if graph is not None:
            graph.reset()
        a2a.close()
