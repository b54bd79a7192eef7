"""One EP rank for the multi-process comm tests (run as a module; never imported by pytest).

usage: python -m tests.helpers.ep_worker SCENARIOS RANK WORLD_SIZE PORT OUT_DIR MODE

MODE "run": join a gloo group on 127.0.0.1:PORT and, for each scenario in the
torch.save'd list, run dispatch → expert compute → combine with this rank's
inputs; save everything observed to OUT_DIR/rank{RANK}.pt.
MODE "layer": the same group, but each scenario runs `MoELayer.forward` with
ExpertParallel (router → dispatch → experts → combine) on this rank's tokens;
saves the output and the layer's expert-load counts.
MODE "async": each scenario blocking, then async with two dispatches in flight (run_async).
MODE "tp_sums": the TP group's sums, torch's all-reduce beside ordered_sums (run_tp_sums).
MODE "die": rank 1 exits right after joining; rank 0 dispatches and records
the error it gets (and how long it took). MODE "stall": the same, but rank 1
stays alive without joining (timeout_s=2).
MODE "lonely": join a 2-rank group that nobody else joins; record the error.
Any unexpected exception is written to OUT_DIR/rank{RANK}.err.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from moelink.comm import destroy, init_process_group, make_all_to_all  # noqa: E402
from moelink.comm.ep_modes import TwoModeAllToAll  # noqa: E402
from moelink.engine.contract.ep_step import EPStepPlan  # noqa: E402
from moelink.kernels.moe import reference_fused_moe  # noqa: E402
from moelink.kernels.ops import ReferenceKernels  # noqa: E402
from moelink.moe.layer import ExpertParallel, MoELayer  # noqa: E402
from moelink.moe.placement import ExpertPlacement  # noqa: E402
from moelink.moe.router import SoftmaxTopKRouter  # noqa: E402
from moelink.moe.stats import MoEStats  # noqa: E402

from tests.helpers.host_syncs import HostSyncCounter, count_moe_layer_syncs  # noqa: E402
from tests.helpers.waits import wait_until  # noqa: E402


def expert_compute(kind: str, recv_x_ND, meta, placement: ExpertPlacement, rank: int, sc: dict):
    ids_NK, w_NK = meta.recv_topk_ids_NK, meta.recv_topk_weights_NK
    if kind == "identity":
        return recv_x_ND.clone()
    local = placement.experts_on_rank(rank)
    if kind == "moe":
        return reference_fused_moe(recv_x_ND, sc["w13"][local], sc["w2"][local], w_NK, ids_NK)
    # "fake": y = x · Σ_k w_k · (global expert id + 1) over this rank's entries.
    gid_NK = torch.tensor(local, dtype=torch.long)[ids_NK.long().clamp(min=0)]
    factor_N = torch.where(ids_NK >= 0, w_NK.to(recv_x_ND.dtype) * (gid_NK + 1), 0).sum(1)
    return recv_x_ND * factor_N[:, None]


def run(scenarios, rank, world_size, group):
    results = {}
    for sc in scenarios:
        placement = ExpertPlacement(**sc["placement"])
        tables = placement.to_tensors("cpu")
        a2a = make_all_to_all(sc["backend"], group, rank, world_size, "cpu", **sc.get("options", {}))
        recv_x, meta = a2a.dispatch(sc["x"][rank], sc["ids"][rank], sc["weights"][rank], tables)
        y = expert_compute(sc["compute"], recv_x, meta, placement, rank, sc)
        out = a2a.combine(y, meta)
        results[sc["name"]] = dict(
            recv_x=recv_x, recv_ids=meta.recv_topk_ids_NK, recv_weights=meta.recv_topk_weights_NK, y=y, out=out,
            send_counts_list=meta.send_counts, recv_counts_list=meta.recv_counts,
            send_counts=meta.send_counts_R.tolist(), recv_counts=meta.recv_counts_R.tolist(),
            num_tokens_sent=meta.num_tokens_sent, num_tokens_received=meta.num_tokens_received,
            bytes_dispatched=meta.bytes_dispatched, bytes_combined=meta.bytes_combined,
            bytes_metadata=meta.bytes_metadata, bytes_inter_node=meta.bytes_inter_node,
            inter_node_rows=None if meta.inter_node_rows is None else meta.inter_node_rows.tolist())
    return results


def run_async(scenarios, rank, world_size, group):
    """Each scenario twice, blocking and async: two dispatches in flight at once (the second of 2·x), a matmul
    issued between each start and its wait, waits in issue order; and the second wait of a handle's error."""
    results = {}
    for sc in scenarios:
        placement = ExpertPlacement(**sc["placement"])
        tables = placement.to_tensors("cpu")
        a2a = make_all_to_all(sc["backend"], group, rank, world_size, "cpu", **sc.get("options", {}))
        x, ids, w = sc["x"][rank], sc["ids"][rank], sc["weights"][rank]
        blocking = []
        for xi in (x, 2 * x):
            recv_x, meta = a2a.dispatch(xi, ids, w, tables)
            blocking.append((recv_x, meta.recv_topk_ids_NK, a2a.combine(expert_compute(sc["compute"], recv_x, meta,
                                                                                      placement, rank, sc), meta)))
        busy = torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        handles = [a2a.dispatch_async(xi, ids, w, tables) for xi in (x, 2 * x)]
        busy = busy @ busy  # work between start and wait
        # A blocking round trip while both are in flight (it must neither block on them nor count as out of order).
        recv_x, meta = a2a.dispatch(3 * x, ids, w, tables)
        between = a2a.combine(expert_compute(sc["compute"], recv_x, meta, placement, rank, sc), meta)
        got, combines = [], []
        for h in handles:
            recv_x, meta = h.wait()
            combines.append(a2a.combine_async(expert_compute(sc["compute"], recv_x, meta, placement, rank, sc), meta))
            got.append([recv_x, meta.recv_topk_ids_NK])
        busy = busy @ busy
        for g, h in zip(got, combines):
            g.append(h.wait())
        try:
            combines[0].wait()
            twice = None
        except RuntimeError as e:  # the point of the check
            twice = str(e)
        results[sc["name"]] = dict(blocking=blocking, got=got, twice=twice, handle=type(handles[0]).__name__,
                                   between=between)
    return results


def run_layer(scenarios, rank, world_size, group):
    """Each scenario: gate [G, D], w13 [G, 2I, D], w2 [G, D, I] of all experts, x per rank, top_k, renormalize.
    Optional: `step` = (mode, max tokens per rank, decode capacity): the backend runs as a TwoModeAllToAll
    given that step plan; the layer's host syncs are counted (expert kernel excluded) and saved."""
    results = {}
    for sc in scenarios:
        placement = ExpertPlacement(**sc["placement"])
        a2a = make_all_to_all(sc["backend"], group, rank, world_size, "cpu", **sc.get("options", {}))
        if sc.get("step") is not None:
            mode, max_tokens, decode_capacity = sc["step"]
            a2a = TwoModeAllToAll(a2a, decode_capacity)
            a2a.begin_step(EPStepPlan(mode, max_tokens))
        ep = ExpertParallel(rank, world_size, placement, a2a, placement.to_tensors("cpu"))
        (G, D), I = sc["gate"].shape, sc["w2"].shape[2]
        stats = MoEStats(1, G, torch.device("cpu"))
        layer = MoELayer(D, I, G, SoftmaxTopKRouter(sc["top_k"], sc["renormalize"]), ReferenceKernels(),
                         torch.float64, ep=ep, stats=stats)
        local = placement.experts_on_rank(rank)
        layer.gate_GD.copy_(sc["gate"])
        layer.w13_EFD.copy_(sc["w13"][local])
        layer.w2_EDI.copy_(sc["w2"][local])
        with HostSyncCounter() as counter:
            per_layer = count_moe_layer_syncs(layer, counter)
            out = layer(sc["x"][rank])
        snap = stats.snapshot()
        results[sc["name"]] = dict(out=out, tokens_per_expert=snap.tokens_per_expert,
                                   tokens_dispatched=snap.tokens_dispatched, inter_node_rows=snap.inter_node_rows,
                                   bytes_inter_node=snap.bytes_inter_node, rows_received=snap.rows_received,
                                   wire_rows=snap.wire_rows, wire_bytes=snap.wire_bytes,
                                   bytes_dispatched=snap.bytes_dispatched, host_syncs=per_layer, sync_where=counter.where)
    return results


def run_tp_sums(scenarios, rank, world_size, group):
    """The TP group's sums (engine/tp/group.py) of one partial per rank placed at several positions of buffers of
    several sizes, torch's all-reduce and the ordered form: {"plain": set of bit patterns seen at the partial's
    position, "ordered": the same for ordered_sums}. Partials whose sum depends on the order: 1, 1e-8, -1."""
    from moelink.engine.tp.group import TensorParallel

    ranks = tuple(range(world_size))
    value = (1.0, 1e-8, -1.0)[rank % 3]
    seen: dict[str, set[str]] = {"plain": set(), "ordered": set()}
    for name, ordered in (("plain", False), ("ordered", True)):
        tp = TensorParallel(rank, world_size, group, ranks, ordered_sums=ordered)
        for n in (3, 30, 3000, 30000):
            for pos in (0, n // 3, n // 2, n - 1):
                x_N = torch.zeros(n)
                x_N[pos] = value
                seen[name].add(float.hex(tp.all_reduce(x_N)[pos].item()))
    return seen


def main() -> None:
    scenario_file, rank, world_size, port, out_dir, mode = sys.argv[1:7]
    rank, world_size, port = int(rank), int(world_size), int(port)
    try:
        if mode == "lonely":
            t0 = time.monotonic()
            try:
                init_process_group(rank, world_size, "127.0.0.1", port, "gloo", timeout_s=2.0)
                result = dict(error=None)
            except Exception as e:  # the point of the test
                result = dict(error=f"{type(e).__name__}: {e}")
            result["elapsed_s"] = time.monotonic() - t0
        else:
            group = init_process_group(rank, world_size, "127.0.0.1", port, "gloo",
                                       timeout_s={"die": 5.0, "stall": 2.0}.get(mode, 30.0))
            if mode in ("die", "stall"):
                # One collective first: init returning on rank 1 does not mean rank 0 has finished
                # its side of the connection mesh, and a peer gone mid-init fails rank 0 at init.
                dist.barrier()
                if rank == 1:
                    torch.save(dict(peer=mode), os.path.join(out_dir, f"rank{rank}.pt"))
                    if mode == "stall":  # alive but never joins: wait until rank 0 has given up
                        rank0_done = os.path.join(out_dir, "rank0.pt")  # rank 0 is another process: polled
                        wait_until(lambda: os.path.exists(rank0_done), 30, "rank 0 to give up", interval=0.1)
                    os._exit(0)
                # Rank 1 writes its file, then exits (die) or stops answering (stall): dispatch after that.
                rank1_file = os.path.join(out_dir, "rank1.pt")  # another process's file: polled
                wait_until(lambda: os.path.exists(rank1_file), 30, "rank 1 to leave", interval=0.05)
                placement = ExpertPlacement(num_experts=4, ep_size=2)
                a2a = make_all_to_all("torch", group, rank, world_size, "cpu")
                t0 = time.monotonic()
                try:
                    a2a.dispatch(torch.ones(3, 4), torch.tensor([[0, 3]] * 3), torch.ones(3, 2),
                                 placement.to_tensors("cpu"))
                    result = dict(error=None)
                except Exception as e:  # the point of the test
                    result = dict(error=f"{type(e).__name__}: {e}")
                result["elapsed_s"] = time.monotonic() - t0
            else:
                runner = {"layer": run_layer, "async": run_async, "tp_sums": run_tp_sums}.get(mode, run)
                result = runner(torch.load(scenario_file, weights_only=False), rank, world_size, group)
                destroy()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    if mode in ("die", "stall"):
        os._exit(0)  # skip the process-group teardown with a dead peer


if __name__ == "__main__":
    main()
