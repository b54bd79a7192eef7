"""Time to sync a trainer's weights into the engine (docs/rl.md): `update_weights_from_distributed` over gloo on CPU
ranks, per GB, beside a bare gloo broadcast of the same tensors.

    python -m moelink.benchmarks.rl_weight_sync [--hidden 512] [--experts 8] [--layers 4] [--moe-intermediate 512]
        [--ep 1,2] [--bucket-mib 16,512] [--rollback-mib 1024,0] [--repeats 2] [--sleep] [--json PATH]

A Qwen3-MoE checkpoint of the given shape (random, float32) is served at each EP size; the trainer, a thread of this
process holding rank 0 of its own gloo group (engine/rl/trainer.TrainerGroup), broadcasts every tensor of it whole and
the engine's ranks (rank 1 .. EP) receive them a bucket at a time, each writing its own experts in place. Each row:
the bytes, the engine call's wall time (best of `--repeats`, after one untimed sync), seconds per GB and GB/s; the
"bare" row is the same tensors broadcast to one receiving thread with no engine (the transport alone), so the rest
of an engine row is the rank side's work (the buckets' writes through the load plan, the cache flush) and, at EP > 1,
the Ray calls and every rank's receive. `--sleep` adds sleep(1) / wake_up at one rank: the bytes freed (weights and
KV cache), the time to sleep (the weights' copy to host memory) and to wake (their copy back).
"""
from __future__ import annotations

import argparse
import json
import platform
import socket
import tempfile
import threading
import time
from pathlib import Path

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def checkpoint(out: Path, hidden: int, experts: int, layers: int, moe_intermediate: int) -> str:
    from moelink.engine.tools.tiny_model import make_tiny_model

    return str(make_tiny_model(out, "qwen3_moe", num_layers=layers, hidden_size=hidden, num_experts=experts, top_k=2,
                               num_heads=4, num_kv_heads=2, head_dim=hidden // 4, moe_intermediate_size=moe_intermediate,
                               vocab_size=512))


def tensors_of(path: str) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return [(k, v) for f in sorted(Path(path).glob("*.safetensors")) for k, v in load_file(f).items()]


def time_bare(named, repeats: int) -> float:
    """Best of `repeats` broadcasts of `named` from a trainer thread to one receiving thread (gloo, no engine)."""
    from moelink.engine.rl.trainer import TrainerGroup
    from moelink.comm.process_group import side_group

    port = _free_port()
    box: dict = {}
    joined = threading.Thread(target=lambda: box.update(trainer=TrainerGroup("127.0.0.1", port, 2, "bare")))
    joined.start()
    group, _store = side_group("127.0.0.1", port, 1, 2, "bare", "gloo", 60.0)
    joined.join()
    trainer = box["trainer"]
    bufs = [torch.empty_like(t) for _, t in named]
    best = float("inf")
    for i in range(-1, repeats):
        sender = threading.Thread(target=trainer.broadcast, args=(named,))
        t0 = time.perf_counter()
        sender.start()
        for b in bufs:
            group.broadcast(b, 0).wait()
        sender.join()
        if i >= 0:
            best = min(best, time.perf_counter() - t0)
    trainer.close()
    return best


def time_engine(path: str, named, ep: int, bucket_bytes: int, repeats: int, rollback_bytes: int = 1 << 30) -> float:
    """Best of `repeats` update_weights_from_distributed calls at EP `ep` (one untimed first); `rollback_bytes` the
    undo log's limit (0: no rollback, nothing saved)."""
    from moelink.engine import LLM
    from moelink.engine.rl.trainer import TrainerGroup

    llm = LLM(path, dtype="float32", expert_parallel_size=ep, num_kv_blocks=64, block_size=16,
              max_num_batched_tokens=64, max_num_seqs=4, enable_weight_updates=True)
    port = _free_port()
    box: dict = {}
    joined = threading.Thread(target=lambda: box.update(trainer=TrainerGroup("127.0.0.1", port, ep + 1, "sync")))
    try:
        joined.start()
        llm.init_weights_update_group("127.0.0.1", port, 1, ep + 1, "sync", "gloo")
        joined.join()
        trainer = box["trainer"]
        specs = TrainerGroup.specs(named)
        best = float("inf")
        for i in range(-1, repeats):
            sender = threading.Thread(target=trainer.broadcast, args=(named,))
            sender.start()
            info = llm.update_weights_from_distributed(**specs, group_name="sync", bucket_bytes=bucket_bytes,
                                                       rollback_bytes=rollback_bytes)
            sender.join()
            if i >= 0:
                best = min(best, info["seconds"])
        llm.destroy_weights_update_group("sync")
        trainer.close()
    finally:
        llm.shutdown()
    return best


def time_sleep(path: str, repeats: int) -> dict:
    """sleep(1) / wake_up at one rank (the best of `repeats`): the bytes freed, the time to sleep and to wake."""
    from moelink.engine import LLM

    llm = LLM(path, dtype="float32", num_kv_blocks=64, block_size=16, max_num_batched_tokens=64, max_num_seqs=4,
              enable_weight_updates=True)
    try:
        best: dict = {}
        for _ in range(repeats):
            slept = llm.sleep(1)
            woke = llm.wake_up()
            if not best or slept["seconds"] + woke["seconds"] < best["sleep_s"] + best["wake_s"]:
                best = {"bytes_freed": slept["bytes_freed"], "sleep_s": slept["seconds"], "wake_s": woke["seconds"]}
    finally:
        llm.shutdown()
    return best


def run(ns) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = checkpoint(Path(tmp) / "ckpt", ns.hidden, ns.experts, ns.layers, ns.moe_intermediate)
        named = tensors_of(path)
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        gb = nbytes / 1e9

        def row(what: str, ep: int, bucket_mib, s: float, rollback_mib=None) -> None:
            rows.append({"what": what, "ep": ep, "bucket_mib": bucket_mib, "rollback_mib": rollback_mib,
                         "tensors": len(named), "bytes": nbytes, "seconds": s, "s_per_gb": s / gb, "gbps": gb / s})
            print(f"{what:>7} ep {ep}  bucket {str(bucket_mib):>5} MiB  rollback {str(rollback_mib):>5} MiB  "
                  f"{len(named):5d} tensors "
                  f"{nbytes / 2**20:8.1f} MiB  {s * 1e3:8.1f} ms  {s / gb:7.2f} s/GB  {gb / s:6.2f} GB/s", flush=True)

        row("bare", 1, None, time_bare(named, ns.repeats))
        for ep in ns.ep:
            for mib in ns.bucket_mib:
                for rb in ns.rollback_mib:
                    row("engine", ep, mib, time_engine(path, named, ep, mib << 20, ns.repeats, rb << 20), rb)
        if ns.sleep:
            s = time_sleep(path, ns.repeats)
            rows.append({"what": "sleep1", "ep": 1, **s})
            print(f" sleep(1) ep 1: {s['bytes_freed'] / 2**20:8.1f} MiB freed, sleep {s['sleep_s'] * 1e3:7.1f} ms, "
                  f"wake_up {s['wake_s'] * 1e3:7.1f} ms", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=512)
    p.add_argument("--ep", default="1,2", help="EP sizes (EP > 1 starts Ray ranks)")
    p.add_argument("--bucket-mib", default="16,512")
    p.add_argument("--rollback-mib", default="1024",
                   help="the undo log's limits to time (rollback_bytes in MiB; 0: no rollback)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sleep", action="store_true", help="also time sleep(1) / wake_up at one rank")
    p.add_argument("--json", default=None, help="write the rows and the machine here")
    ns = p.parse_args(argv)
    ns.ep = [int(x) for x in ns.ep.split(",")]
    ns.bucket_mib = [int(x) for x in ns.bucket_mib.split(",")]
    ns.rollback_mib = [int(x) for x in ns.rollback_mib.split(",")]
    for name in ("hidden", "experts", "layers", "moe_intermediate", "repeats"):
        if getattr(ns, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if any(e < 1 for e in ns.ep) or any(b < 1 for b in ns.bucket_mib):
        p.error("--ep and --bucket-mib take positive integers")
    if any(r < 0 for r in ns.rollback_mib):
        p.error("--rollback-mib takes integers >= 0 (0: no rollback)")
    rows = run(ns)
    if ns.json:
        out = {"benchmark": "rl_weight_sync", "machine": platform.platform(), "cpus": torch.get_num_threads(),
               "device": "cpu (gloo, loopback)", "date": time.strftime("%Y-%m-%d"),
               "shape": {k: getattr(ns, k) for k in ("hidden", "experts", "layers", "moe_intermediate")}, "rows": rows}
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
