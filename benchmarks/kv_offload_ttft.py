"""TTFT of a long prompt whose prefix KV the device prefix cache evicted to the offload tiers (loaded back,
engine/kv_transfer/offload.py), beside recomputing it (no offload) and beside a device prefix-cache hit.

    python -m moelink.benchmarks.kv_offload_ttft [--tokens 4096] [--repeats 3] [--json PATH]

One engine on CPU with a small random Qwen3-MoE checkpoint (4 layers, hidden 256: big enough that a 4k-token
prefill costs about a second, not microseconds), a KV pool of just over two prompts, so the prompts that follow
push the first one's blocks out of the device pool (into the tiers, when the engine has them). Each TTFT is a
`generate` of one token (prefill, or the load and the last prompt token, then the first token), best of
`--repeats`, every mode side by side in one process:
  - recompute: the evicted prompt again on an engine without offload (the whole prompt computed);
  - host: the same with a host tier big enough for every evicted block (they are loaded back from host memory);
  - disk: the same with a host tier of 512 blocks and a disk tier under it (in a temporary directory): the
    target's blocks are pushed down to the file by the blocks evicted after them, and read back from it;
  - device: the prompt again right after it ran, on the engine without offload (a prefix-cache hit on the
    device: every full block but the one holding the last prompt token).
The tiers' counters (`offload_tier_stats`) of each offload engine are saved beside the times.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector
from moelink.engine.tools.tiny_model import make_tiny_model

BLOCK = 16
ONE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
MODES = ("recompute", "host", "disk", "device")


def _ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = llm.generate([prompt], ONE, use_tqdm=False)[0]
    return time.perf_counter() - t0, out.num_cached_tokens


def _connector(mode: str, tmp: str) -> OffloadKVConnector | None:
    if mode == "host":
        return OffloadKVConnector(OffloadConfig(host_bytes=8 << 30))
    if mode == "disk":
        # 512 blocks of this model (4 layers x k, v x 2 heads x 32 x fp32 x 16 tokens = 32 KiB): room for the
        # evictions of the steps in flight (2048 tokens = 128 blocks a step; a step's slots stay pinned until it
        # is reported, two steps in the overlapped loop), less than the blocks evicted after the target's.
        return OffloadKVConnector(OffloadConfig(host_bytes=512 * 32768, disk_bytes=8 << 30, disk_dir=tmp))
    return None


def run(tokens: int, repeats: int, path: str, tmp: str) -> dict:
    rng = random.Random(0)
    per_prompt = -(-(tokens + 1) // BLOCK)
    blocks = 2 * per_prompt + 4  # two prompts fit
    kw = dict(dtype="float32", num_kv_blocks=blocks, block_size=BLOCK, max_num_batched_tokens=2048,
              max_model_len=tokens + 8, skip_warmup=True)
    rows = {m: [] for m in MODES}
    cached, tiers = {}, {}
    for mode in ("recompute", "host", "disk"):
        conn = _connector(mode, tmp)
        with LLM(path, kv_connector=conn, **kw) as llm:
            for _ in range(repeats):
                # Enough other prompts that every one of the target's blocks leaves the device pool (freed blocks
                # are reused least recently used first, the target's tail before its head).
                n = 3 + blocks // per_prompt
                target, *others = ([rng.randrange(500) for _ in range(tokens)] for _ in range(n))
                _ttft(llm, target)
                if mode == "recompute":  # without offload: a pure device hit
                    s, cached["device"] = _ttft(llm, target)
                    rows["device"].append(s)
                for other in others:  # the target's blocks are gone from the device pool after these
                    _ttft(llm, other)
                s, cached[mode] = _ttft(llm, target)
                rows[mode].append(s)
        if conn is not None:
            tiers[mode] = {t: dataclasses.asdict(st) for t, st in conn.offload_tier_stats().items()}
    best = {k: min(v) for k, v in rows.items()}
    return {"tokens": tokens, "repeats": repeats, "ttft_s": best,
            "vs_recompute": {k: best["recompute"] / v for k, v in best.items()},
            "num_cached_tokens": {k: cached[k] for k in MODES}, "tiers": tiers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    ns = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(make_tiny_model(Path(tmp) / "m", num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2,
                                   head_dim=32, num_experts=8, top_k=2, moe_intermediate_size=256,
                                   max_position_embeddings=max(1024, ns.tokens + 64)))
        res = run(ns.tokens, ns.repeats, path, str(Path(tmp) / "kv"))
    t, x = res["ttft_s"], res["vs_recompute"]
    label = {"recompute": "recompute", "host": "host tier", "disk": "disk tier", "device": "device hit"}
    print(f"{ns.tokens} tokens, TTFT: " + ", ".join(f"{label[m]} {t[m] * 1e3:.1f} ms ({x[m]:.1f}x)" for m in MODES)
          + f"; cached tokens {res['num_cached_tokens']}")
    if ns.json:
        out = {"benchmark": "kv_offload_ttft", "machine": platform.platform(), "cpus": torch.get_num_threads(),
               "device": "cpu", "date": time.strftime("%Y-%m-%d"),
               "command": "python -m moelink.benchmarks.kv_offload_ttft "
                          + " ".join(sys.argv[1:] if argv is None else argv), **res}
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
