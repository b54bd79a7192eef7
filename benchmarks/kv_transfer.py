"""KV transfer between a prefill and a decode engine: one fetch of model-shaped prompt KV over each named
transport (engine/kv_transfer/transport.py), beside a plain copy of the same bytes on the same machine.

    python -m moelink.benchmarks.kv_transfer [--shape deepseek-v3|qwen3-30b-a3b] [--tokens 1024,4096]
        [--transports nixl,tcp,shm] [--repeats 3] [--json PATH]

Each row: the bytes of one request's prompt KV (every layer, bf16, in 16-token blocks: MLA's 576-wide latent
for DeepSeek-V3, 4 KV heads x 128 x K and V for Qwen3-30B-A3B), the load time (what a decode rank's fetch thread
does: connect, header and layout check, and the bytes, each layer written into the cache blocks as it arrives,
engine/kv_transfer/arrival.py), GB/s of the load, and the ratio to a host memcpy of the same bytes measured in the
same run (a clone: the memcpy into fresh memory, page faults included, as a transport's buffers are). The planner's
disaggregated serving reads `transport_gbps` from this JSON (planner/kv_handoff.py).

"nixl_in_place" (not a transport name: NIXL with `nixl_in_place`, engine/kv_transfer/nixl_inplace.py) times what a
load costs when the prefill rank holds the blocks in its cache (registered once) and the decode rank READs them
straight into its own cache blocks (registered once, through the connector's ArrivalWriter): no host copy on
either side; the other rows read a saved host copy (the prefill side's copy out of its cache is not timed there).
The first load of each transport is not timed (NIXL: the two agents' UCX connection, ~0.1 s, made once per pair of
ranks in a deployment, not per request; in place also the caches' registrations, made once per rank).
"""
from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import torch

from moelink.engine.kv_transfer.arrival import ArrivalWriter
from moelink.engine.kv_transfer.store import HoldBounds, SavedKVStore
from moelink.engine.kv_transfer.auth import SecretAuth
from moelink.engine.kv_transfer.transport import KV_TRANSPORTS, NixlTransport, make_transport
from moelink.engine.contract.kv_blocks import PagedKVBlocks, SavedKV
from moelink.scheduler.outputs import KVTransfer

BLOCK = 16
# layers, then per layer the tensors' row width in bytes per token (bf16)
SHAPES = {
    "deepseek-v3": (61, (576 * 2,)),  # MLA: one latent+rope row per token
    "qwen3-30b-a3b": (48, (4 * 128 * 2, 4 * 128 * 2)),  # GQA: K and V, 4 KV heads x 128
}


def saved_kv(shape: str, num_tokens: int) -> SavedKV:
    layers, widths = SHAPES[shape]
    nblocks = -(-num_tokens // BLOCK)
    layout = tuple(("full", tuple(("torch.bfloat16", (BLOCK, 1, w // 2)) for w in widths)) for _ in range(layers))
    groups = [(list(range(nblocks)), tuple(torch.randint(0, 255, (nblocks, BLOCK, 1, w), dtype=torch.uint8)
                                           for w in widths)) for _ in range(layers)]
    return SavedKV(num_tokens, tuple(range(num_tokens)), layout, groups)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cache_like(saved: SavedKV) -> tuple[PagedKVBlocks, KVTransfer]:
    """A decode rank's cache for `saved`'s layout (twice the blocks; the request's at odd ids) and its load."""
    nblocks = len(saved.groups[0][0])
    caches = [tuple(torch.zeros((2 * nblocks,) + tuple(shape), dtype=getattr(torch, dt.removeprefix("torch.")))
                    for dt, shape in tensors) for _, tensors in saved.layout]
    kv = PagedKVBlocks(caches, None, BLOCK)
    return kv, KVTransfer(0, "bench", [2 * i + 1 for i in range(nblocks)], saved.num_tokens)


def time_load(transport_name: str, saved: SavedKV, repeats: int) -> float:
    """Best of `repeats` loads (seconds), each of a fresh store entry: the fetch with every group written into
    the cache blocks as it arrives, as a decode rank's fetch thread does (engine/kv_transfer/arrival.py)."""
    # NIXL serves a peer the deployment secret authenticated over NIXL (without one, the bytes go on the socket).
    auth = SecretAuth(BENCH_SECRET) if transport_name == "nixl" else None
    transport = make_transport(transport_name, 10.0, 600.0, auth=auth)
    # The decode side's transport object of its own, as another engine's would be (NIXL: another agent, so the
    # READ goes through UCX between two agents, not a local copy).
    client = make_transport(transport_name, 10.0, 600.0, auth=auth)
    store = SavedKVStore(600.0, 1 << 40)
    port = _free_port()
    server = transport.serve(store, "127.0.0.1", port)
    kv, t = cache_like(saved)
    best = float("inf")
    try:
        nblocks = len(saved.groups[0][0])
        for i in range(-1, repeats):  # -1: the warm-up load, untimed
            store.put(f"k{i}", saved)
            nbytes = [0]

            def write(g, idx, rows):
                kv.write_group(g, t, idx, rows)
                nbytes[0] += sum(r.numel() for r in rows)

            t0 = time.perf_counter()
            client.fetch("127.0.0.1", port, f"k{i}", saved.layout, list(saved.token_ids), nblocks, 600.0,
                            torch.device("cpu"), on_group=write)
            if i >= 0:
                best = min(best, time.perf_counter() - t0)
            assert nbytes[0] == saved.nbytes
    finally:
        server.close()
    return best


IN_PLACE = "nixl_in_place"
BENCH_SECRET = b"moelink-kv-benchmark-secret-0123"  # both ends of the benchmark's NIXL loads prove it


def time_load_in_place(saved: SavedKV, repeats: int) -> float:
    """Best of `repeats` NIXL loads in place (seconds): `saved`'s rows put in a prefill cache, held there under a
    fresh key per load; each fetch stages the held rows out (the copy registered for that fetch), and the decode
    side READs them into its cache's blocks through the connector's writer."""
    auth = SecretAuth(BENCH_SECRET)
    prefill, client = NixlTransport(10.0, 600.0, auth), NixlTransport(10.0, 600.0, auth)
    store = SavedKVStore(600.0, 1 << 40)
    port = _free_port()
    server = prefill.serve(store, "127.0.0.1", port)
    src_kv, src_t = cache_like(saved)
    src_kv.write(src_t, saved)
    region = prefill.hold_region(src_kv)
    kv, t = cache_like(saved)
    best = float("inf")
    try:
        nblocks = len(saved.groups[0][0])
        for i in range(-1, repeats):  # -1: the warm-up load, untimed
            store.hold(f"k{i}", region.held(KVTransfer(i + 2, "bench", src_t.block_ids, saved.num_tokens,
                                                       token_ids=saved.token_ids)), 600.0,
                       HoldBounds(1 << 40, 1 << 40))
            writer = ArrivalWriter(t, kv, 0, lambda: 0, threading.Lock())
            t0 = time.perf_counter()
            client.fetch("127.0.0.1", port, f"k{i}", saved.layout, list(saved.token_ids), nblocks, 600.0,
                         torch.device("cpu"), on_group=writer)
            if i >= 0:
                best = min(best, time.perf_counter() - t0)
            assert writer.nbytes == saved.nbytes and client.agent(serving=False).num_staged_bytes == 0
    finally:
        server.close()
        prefill.close()
        client.close()
    return best


def time_memcpy(saved: SavedKV, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _, ts in saved.groups:
            for t in ts:
                t.clone()
        best = min(best, time.perf_counter() - t0)
    return best


def run(shapes, tokens, transports, repeats) -> list[dict]:
    rows = []
    for shape in shapes:
        for n in tokens:
            saved = saved_kv(shape, n)
            copy_s = time_memcpy(saved, repeats)
            for name in transports:
                s = time_load_in_place(saved, repeats) if name == IN_PLACE else time_load(name, saved, repeats)
                gb = saved.nbytes / 1e9
                rows.append({"shape": shape, "tokens": n, "transport": name, "bytes": saved.nbytes, "load_s": s,
                             "transport_gbps": gb / s, "memcpy_gbps": gb / copy_s, "ratio_to_memcpy": copy_s / s})
                print(f"{shape:>14} {n:>6} tok {saved.nbytes / 2**20:8.1f} MiB  {name:>10}: load {s * 1e3:7.1f} ms "
                      f"{gb / s:6.2f} GB/s  memcpy {gb / copy_s:6.2f} GB/s  ratio {copy_s / s:.3f}", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="deepseek-v3,qwen3-30b-a3b")
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--transports", default=",".join(sorted(KV_TRANSPORTS)),
                   help=f"transport names, and {IN_PLACE} (NIXL reading the prefill cache's blocks in place)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="write the rows and the machine here")
    ns = p.parse_args(argv)
    shapes = ns.shape.split(",")
    for s in shapes:
        if s not in SHAPES:
            p.error(f"--shape {s!r}: choose from {', '.join(SHAPES)}")
    transports = ns.transports.split(",")
    for t in transports:
        if t not in KV_TRANSPORTS and t != IN_PLACE:
            p.error(f"--transports {t!r}: choose from {', '.join(sorted(KV_TRANSPORTS) + [IN_PLACE])}")
    rows = run(shapes, [int(x) for x in ns.tokens.split(",")], transports, ns.repeats)
    if ns.json:
        out = {"benchmark": "kv_transfer", "machine": platform.platform(), "cpus": torch.get_num_threads(),
               "device": "cpu (loopback)", "date": time.strftime("%Y-%m-%d"), "rows": rows}
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
