"""KV handoff between two processes on one device (the issue 30 GPU measurement): a prefill rank in a child
process saves a request's prompt KV out of its paged cache and serves it; this process, the decode rank, loads
it into its own paged cache, each layer written as it arrives. Both through the connector's real worker halves
(engine/kv_transfer/remote.py's save: `PagedKVBlocks.read_async` and the store; the load: the transport's fetch
with `arrival.ArrivalWriter`), beside a device copy of the same bytes measured in the same run.

    python -m moelink.benchmarks.kv_transfer_engines --device cuda [--shape deepseek-v3,qwen3-30b-a3b]
        [--tokens 1024,4096] [--transports tcp,shm,collective] [--repeats 3] [--json PATH] [--prefill-device D]

Rows: save seconds (the prefill rank's copy out of its blocks until the store holds it), load seconds (fetch
start until the last layer has landed in the decode rank's blocks), the load's GB/s and its ratio to the device
copy (a clone of the same bytes on `--device`). `--device cpu` runs the same path on the CPU machines (the test
suite's smoke). The prefill process takes a second GPU where there is one (`--prefill-device`, default cuda:1 when
two are visible); on one GPU the collective leg is left out: NCCL refuses two ranks on one device.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import socket
import threading
import time
from pathlib import Path

import torch

from moelink.engine.kv_transfer.arrival import ArrivalWriter
from moelink.engine.kv_transfer.remote import RemoteKVConfig, RemoteWorkerSide
from moelink.engine.kv_transfer.auth import SecretAuth
from moelink.engine.kv_transfer.transport import KV_TRANSPORTS, make_transport
from moelink.engine.contract.kv_blocks import PagedKVBlocks
from moelink.scheduler.outputs import KVTransfer

from .kv_transfer import BLOCK, SHAPES

SHAPES_MODULE = f"{__package__}.kv_transfer" if __package__ else "kv_transfer"


def paged_cache(shape: str, num_tokens: int, device: str) -> tuple[PagedKVBlocks, list[int]]:
    """A rank's bf16 paged cache of `shape` with room for the request twice, random; the request's blocks."""
    layers, widths = SHAPES[shape]
    nblocks = -(-num_tokens // BLOCK)
    caches = [tuple(torch.randn(2 * nblocks, BLOCK, 1, w // 2, device=device, dtype=torch.bfloat16) for w in widths)
              for _ in range(layers)]
    return PagedKVBlocks(caches, None, BLOCK), [2 * i + 1 for i in range(nblocks)]


def _gpu(device: str) -> int | None:
    """The GPU index `device` names ("cuda" is GPU 0 here: no process sets another current device); None off GPU."""
    d = torch.device(device)
    return (d.index or 0) if d.type == "cuda" else None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _prefill(conn, transport: str, port: int, shape: str, num_tokens: int, device: str) -> None:
    """The child: saves the request on each ("save", i) and answers the seconds it took; ("stop",) ends it."""
    blocks, table = paged_cache(shape, num_tokens, device)
    # The deployment secret (NIXL reads only for an authenticated peer), and holds allowed the whole cache (its
    # request is half of it: the default share would copy it instead).
    side = RemoteWorkerSide(RemoteKVConfig(transport=transport, port=port, max_saved_bytes=1 << 40, secret=SECRET,
                                           nixl_hold_fraction=1.0, nixl_hold_client_fraction=1.0), 0)
    conn.send("ready")
    try:
        while (msg := conn.recv())[0] == "save":
            _sync(device)
            t0 = time.perf_counter()
            side.start_save(KVTransfer(msg[1], f"r{msg[1]}", table, num_tokens, token_ids=tuple(range(num_tokens)),
                                       params=_capability(msg[1])), blocks)
            # A copy's event, queried as the rank's step loop would; over NIXL in place nothing is copied: the save
            # is held in the cache at once and reported done only once read (so waiting here would never end).
            while not side.holds_saves_of(blocks) and not side.poll():
                time.sleep(0.0002)
            conn.send(time.perf_counter() - t0)
    finally:
        side.close()


SECRET = b"moelink-kv-benchmark-secret-0123"  # both ends prove it


def _capability(i: int) -> str:
    """The key save i is stored and fetched under (the shape of a prefill engine's capability)."""
    return f"benchmark-capability-{i:06d}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_context(device: str, prefill_device: str) -> mp.context.SpawnContext | mp.context.ForkServerContext:
    """How the prefill process starts. On a GPU spawned: a fresh CUDA context in the child. On CPU (`--device cpu`,
    the suite's smoke) from a fork server that imported this module, torch included, once: each transport's child
    is then a fork of a process that never ran a torch op (as clean as a spawned one) instead of a Python start
    that imports torch again (~1.9 s of CPU per transport)."""
    if _gpu(device) is not None or _gpu(prefill_device) is not None:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # What this module imports (not the module itself: the child runs it as __mp_main__, which would warn that it
    # was imported already).
    ctx.set_forkserver_preload(["torch", *sorted({f.__module__ for f in (ArrivalWriter, RemoteWorkerSide, SecretAuth,
                                                                          make_transport, PagedKVBlocks, KVTransfer)}),
                                SHAPES_MODULE])
    return ctx


def time_handoff(transport: str, shape: str, num_tokens: int, device: str, repeats: int,
                 prefill_device: str | None = None) -> dict:
    """Best save and best load seconds over `repeats` handoffs, and the bytes moved. `prefill_device`: the child's
    (default `device`)."""
    port = _free_port()
    ctx = _child_context(device, prefill_device or device)
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_prefill, args=(child, transport, port, shape, num_tokens, prefill_device or device),
                       daemon=True)
    proc.start()
    try:
        if not parent.poll(300) or parent.recv() != "ready":
            raise RuntimeError("the prefill process did not start")
        blocks, table = paged_cache(shape, num_tokens, device)
        fetcher = make_transport(transport, 10.0, 600.0, auth=SecretAuth(SECRET))
        best_save = best_load = float("inf")
        nbytes = 0
        for i in range(repeats):
            parent.send(("save", i))
            best_save = min(best_save, parent.recv())
            t = KVTransfer(i, f"k{i}", table, num_tokens)
            writer = ArrivalWriter(t, blocks, 0, lambda: 0, threading.Lock())
            _sync(device)
            t0 = time.perf_counter()
            fetcher.fetch("127.0.0.1", port, _capability(i), blocks.layout, list(range(num_tokens)), len(table), 600.0,
                          blocks.device, on_group=writer)
            while not writer.done():
                time.sleep(0.0002)
            best_load = min(best_load, time.perf_counter() - t0)
            nbytes = writer.nbytes
        parent.send(("stop",))
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
    return {"save_s": best_save, "load_s": best_load, "bytes": nbytes}


def time_device_copy(nbytes: int, device: str, repeats: int) -> float:
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    best = float("inf")
    for _ in range(max(repeats, 3)):
        _sync(device)
        t0 = time.perf_counter()
        x.clone()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shape", default="deepseek-v3,qwen3-30b-a3b")
    p.add_argument("--tokens", default="1024,4096")
    p.add_argument("--transports", default=None,
                   help="comma list (default: every transport this machine can run; nixl only where its package is)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--prefill-device", default=None,
                   help="the prefill process's device (default: cuda:1 when --device is cuda and two GPUs are "
                        "visible, else --device)")
    ns = p.parse_args(argv)
    if ns.prefill_device is None:
        two = ns.device.startswith("cuda") and torch.cuda.device_count() > 1
        ns.prefill_device = "cuda:1" if two and ns.device in ("cuda", "cuda:0") else ns.device
    one_gpu = ns.device.startswith("cuda") and _gpu(ns.prefill_device) == _gpu(ns.device)
    for s in ns.shape.split(","):
        if s not in SHAPES:
            p.error(f"--shape {s!r}: choose from {', '.join(SHAPES)}")
    if ns.transports is None:
        # The GPU image carries no nixl (docs/gpu-session-steps.md): without its package the leg is left out, said
        # once, instead of ending the run before any result is written.
        from moelink.engine.kv_transfer.nixl import nixl_available

        ns.transports = ",".join(t for t in sorted(KV_TRANSPORTS) if t != "nixl" or nixl_available())
        if "nixl" not in ns.transports.split(","):
            print("note: nixl is not installed here: its leg is skipped (--transports names the legs to run)")
        if one_gpu:
            ns.transports = ",".join(t for t in ns.transports.split(",") if t != "collective")
            print("note: one GPU for both processes: the collective (NCCL) leg is skipped, NCCL refuses two ranks "
                  "on one device (--prefill-device names a second GPU)")
    elif one_gpu and "collective" in ns.transports.split(","):
        p.error(f"--transports collective: NCCL refuses two ranks on one device; --prefill-device must differ from "
                f"--device ({ns.device})")
    for t in ns.transports.split(","):
        if t not in KV_TRANSPORTS:
            p.error(f"--transports {t!r}: choose from {', '.join(sorted(KV_TRANSPORTS))}")
    rows = []
    for shape in ns.shape.split(","):
        for n in (int(x) for x in ns.tokens.split(",")):
            for name in ns.transports.split(","):
                r = time_handoff(name, shape, n, ns.device, ns.repeats, ns.prefill_device)
                copy_s = time_device_copy(r["bytes"], ns.device, ns.repeats)
                gb = r["bytes"] / 1e9
                r |= {"shape": shape, "tokens": n, "transport": name, "load_gbps": gb / r["load_s"],
                      "device_copy_gbps": gb / copy_s, "ratio_to_device_copy": copy_s / r["load_s"]}
                rows.append(r)
                print(f"{shape:>14} {n:>6} tok {r['bytes'] / 2**20:8.1f} MiB {name:>10}: "
                      f"save {r['save_s'] * 1e3:7.1f} ms"
                      f"  load {r['load_s'] * 1e3:7.1f} ms {gb / r['load_s']:6.2f} GB/s  device copy "
                      f"{gb / copy_s:7.1f} GB/s  ratio {copy_s / r['load_s']:.3f}", flush=True)
    if ns.json:
        dev = torch.cuda.get_device_name() if ns.device.startswith("cuda") else "cpu"
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps({"benchmark": "kv_transfer_engines", "device": dev, "machine":
                                             platform.platform(), "date": time.strftime("%Y-%m-%d"), "rows": rows},
                                            indent=1))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
