"""Network rows per token of the two-level all-to-all against the one-level one, measured on CPU ranks.

    python -m moelink.benchmarks.two_level_traffic [--nodes 2] [--ranks-per-node 2 4] [--experts-per-rank 4]
                                                   [--top-k 4 8] [--tokens 256]

For each (ranks per node, top-k) the ranks run as processes over gloo on
127.0.0.1 and dispatch the same seeded uniform-random routing through the
"torch" backend (one row per (token, destination rank)) and through
"two_level" (one row per (token, destination node) crosses nodes). The table
is what the backends' own counters say: rows that crossed nodes per token
(one-level: rows to ranks in another node; two-level: `inter_node_rows`), and
dispatch rows per token (the same for both). Combine outputs are compared
(allclose: the summation order differs). Speed across a real network is the
cluster model's job (`moelink plan`); this is the traffic it prices.
"""
from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.multiprocessing as mp


def _rank(rank: int, world: int, port: int, nodes: list[int], cfg: dict, out_dir: str) -> None:
    from moelink.comm import destroy, init_process_group, make_all_to_all
    from moelink.moe.placement import ExpertPlacement

    torch.set_num_threads(1)
    group = init_process_group(rank, world, "127.0.0.1", port, "gloo")
    g = torch.Generator().manual_seed(1000 + rank)
    T, G, K = cfg["tokens"], cfg["experts"], cfg["top_k"]
    x = torch.randn(T, cfg["hidden"], generator=g)
    ids = torch.stack([torch.randperm(G, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), -1)
    tables = ExpertPlacement(num_experts=G, ep_size=world).to_tensors("cpu")
    result = {}
    for name, options in (("torch", {}), ("two_level", dict(node_of_rank=nodes))):
        a2a = make_all_to_all(name, group, rank, world, "cpu", **options)
        recv, meta = a2a.dispatch(x, ids, w, tables)
        out = a2a.combine(recv, meta)
        if meta.inter_node_rows is not None:
            crossing = int(meta.inter_node_rows.sum().item())
        else:
            sent = meta.send_counts
            assert sent is not None  # the counted backends fill it
            crossing = sum(c for r, c in enumerate(sent) if nodes[r] != nodes[rank])
        result[name] = dict(crossing=crossing, rows=meta.num_tokens_sent, out=out)
    torch.testing.assert_close(result["torch"]["out"], result["two_level"]["out"])
    torch.save({k: dict(crossing=v["crossing"], rows=v["rows"]) for k, v in result.items()},
               os.path.join(out_dir, f"rank{rank}.pt"))
    destroy()


def measure(num_nodes: int, per_node: int, experts_per_rank: int, top_k: int, tokens: int, hidden: int = 64) -> dict:
    from moelink.comm import find_free_port

    world = num_nodes * per_node
    nodes = [r // per_node for r in range(world)]
    cfg = dict(tokens=tokens, experts=world * experts_per_rank, top_k=top_k, hidden=hidden)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(_rank, args=(world, find_free_port("127.0.0.1"), nodes, cfg, out_dir), nprocs=world,
                           start_method="spawn", join=True)
        per_rank = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)]
    total = world * tokens
    return dict(ranks=world, nodes=num_nodes, experts=cfg["experts"], top_k=top_k, tokens_per_rank=tokens,
                dispatch_rows_per_token=sum(p["two_level"]["rows"] for p in per_rank) / total,
                one_level_network_rows_per_token=sum(p["torch"]["crossing"] for p in per_rank) / total,
                two_level_network_rows_per_token=sum(p["two_level"]["crossing"] for p in per_rank) / total)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--ranks-per-node", type=int, nargs="+", default=[2, 4])
    p.add_argument("--experts-per-rank", type=int, default=4)
    p.add_argument("--top-k", type=int, nargs="+", default=[4, 8])
    p.add_argument("--tokens", type=int, default=256)
    a = p.parse_args(argv)
    print("| ranks (nodes x per node) | experts | top-k | dispatch rows/token | network rows/token, one-level "
          "| network rows/token, two_level | saving |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for per_node, top_k in zip(a.ranks_per_node, a.top_k):
        m = measure(a.nodes, per_node, a.experts_per_rank, top_k, a.tokens)
        one, two = m["one_level_network_rows_per_token"], m["two_level_network_rows_per_token"]
        print(f"| {m['ranks']} ({a.nodes} x {per_node}) | {m['experts']} | {top_k} | "
              f"{m['dispatch_rows_per_token']:.2f} | {one:.2f} | {two:.2f} | {one / two:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
