"""TTFT of a long prompt whose prefix KV the device prefix cache evicted to the host offload tier (loaded back,
engine/kv_transfer/offload.py), beside recomputing it (no offload) and beside a device prefix-cache hit.

    python -m moelink.benchmarks.kv_offload_ttft [--tokens 4096] [--repeats 3] [--json PATH]

One engine on CPU with a small random Qwen3-MoE checkpoint (4 layers, hidden 256: big enough that a 4k-token
prefill costs seconds, not microseconds), a KV pool of just over two prompts, so the prompts that follow push the
first one's blocks out of the prefix cache. Each TTFT is a `generate` of one token (prefill + the first
token), best of `--repeats`:
  - recompute: the evicted prompt again on an engine without offload (the whole prompt computed);
  - host: the same on an engine with `OffloadKVConnector` (its blocks loaded back from host memory, the last
    prompt token computed);
  - device: the prompt again right after it ran, on the engine without offload (a prefix-cache hit on the device;
    with offload the tier would also serve the block the hit leaves out for the last token's logits).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import torch

from moelink.engine import LLM, SamplingParams
from moelink.engine.kv_transfer.offload import OffloadConfig, OffloadKVConnector, OffloadTiers
from moelink.engine.tools.tiny_model import make_tiny_model

BLOCK = 16
ONE = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


def _ttft(llm: LLM, prompt: list[int]) -> tuple[float, int]:
    t0 = time.perf_counter()
    out = llm.generate([prompt], ONE, use_tqdm=False)[0]
    return time.perf_counter() - t0, out.num_cached_tokens


def run(tokens: int, repeats: int, path: str) -> dict:
    rng = random.Random(0)
    per_prompt = -(-(tokens + 1) // BLOCK)
    blocks = 2 * per_prompt + 4  # two prompts fit
    kw = dict(dtype="float32", num_kv_blocks=blocks, block_size=BLOCK, max_num_batched_tokens=2048,
              max_model_len=tokens + 8, skip_warmup=True)
    rows = {"recompute": [], "host": [], "device": []}
    cached = {}
    for mode in ("recompute", "host"):
        tiers = OffloadTiers(OffloadConfig(host_bytes=8 << 30)) if mode == "host" else None
        with LLM(path, kv_connector=OffloadKVConnector(tiers) if tiers else None, **kw) as llm:
            for r in range(repeats):
                # Enough other prompts that every one of the target's blocks leaves the device pool (freed blocks
                # are reused least recently used first, the target's tail before its head).
                n = 3 + blocks // per_prompt
                target, *others = ([rng.randrange(500) for _ in range(tokens)] for _ in range(n))
                _ttft(llm, target)
                if mode == "recompute":  # without offload: a pure device hit (with it the tier would serve the tail)
                    s, cached["device"] = _ttft(llm, target)  # still on the device: a prefix hit
                    rows["device"].append(s)
                for other in others:  # the target's blocks are gone from the device pool after these
                    _ttft(llm, other)
                s, cached[mode] = _ttft(llm, target)
                rows[mode].append(s)
            if tiers is not None:
                host = tiers.stats["host"]
                cached["host_tier"] = {"hits": host.hits, "loaded_bytes": host.loaded_bytes, "load_s": host.load_s}
    return {"tokens": tokens, "ttft_s": {k: min(v) for k, v in rows.items()},
            "num_cached_tokens": {k: cached[k] for k in ("recompute", "host", "device")},
            "host_tier": cached.get("host_tier")}


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
        res = run(ns.tokens, ns.repeats, path)
    t = res["ttft_s"]
    print(f"{ns.tokens} tokens: recompute {t['recompute'] * 1e3:.1f} ms, host tier {t['host'] * 1e3:.1f} ms, "
          f"device hit {t['device'] * 1e3:.1f} ms; cached tokens {res['num_cached_tokens']}")
    if ns.json:
        out = {"benchmark": "kv_offload_ttft", "machine": platform.platform(), "cpus": torch.get_num_threads(),
               "device": "cpu", "date": time.strftime("%Y-%m-%d"), **res}
        Path(ns.json).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {ns.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
