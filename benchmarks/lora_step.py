"""Engine step time with 0, 1 and 8 LoRA adapters in the batch (docs/lora.md#cost), on whatever device runs it.

    python -m moelink.benchmarks.lora_step [--batch 16] [--rank 16] [--tokens 32] [--experts] [--out FILE]

A random Qwen3-MoE (float32; hidden 256, 8 query / 2 kv heads of 32, 4 layers of 8 experts top-2) served by `LLM`
with enable_lora and max_loras=8; adapters of rank `--rank` on q/k/v/o written in peft's published layout
(adapter_config.json + adapter_model.safetensors, random A and B); with --experts on the routed experts too (peft's
target_parameters layout: a step with them runs the experts' LoRA path, engine/lora/experts.py). The batch: `--batch`
requests of 16 prompt tokens decoding `--tokens` each, all on the base model (0), all on one adapter (1), or spread over 8 adapters (8). Timed: the
wall time of the engine's steps for the whole batch (prefill and decode), over the steps taken, median of 5 runs
after a warm-up run; the ratio is each against 0 adapters. On a CPU this is the plain-torch path
(kernels/lora.py: each row's A and B gathered, one batched matmul), the worst case of the gather.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from moelink.engine import LLM, LoRARequest, SamplingParams
from moelink.engine.api.provenance import write_result
from moelink.engine.tools.tiny_model import make_tiny_model

SIZES = dict(num_layers=4, hidden_size=256, num_heads=8, num_kv_heads=2, head_dim=32, num_experts=8, top_k=2,
             moe_intermediate_size=256, intermediate_size=512, vocab_size=512)
TARGETS = {"q_proj": (256, 256), "k_proj": (64, 256), "v_proj": (64, 256), "o_proj": (256, 256)}  # (N, K)


def write_adapter(out: Path, rank: int, seed: int, experts: bool = False) -> str:
    """A LoRA adapter as peft's save_pretrained lays it out, random A and B; `experts`: the routed experts' fused
    tensors too (per-expert A [r E, K], B [N, r E], gate_up_proj nested under base_layer)."""
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    E, D, I = SIZES["num_experts"], SIZES["hidden_size"], SIZES["moe_intermediate_size"]
    for layer in range(SIZES["num_layers"]):
        pairs = [(f"self_attn.{name}", n, k) for name, (n, k) in TARGETS.items()]
        if experts:
            pairs += [("mlp.experts.base_layer", 2 * I, D), ("mlp.experts", D, I)]
        for name, n, k in pairs:
            key = f"base_model.model.model.layers.{layer}.{name}"
            r = rank * (E if "experts" in name else 1)
            tensors[key + ".lora_A.weight"] = torch.randn(r, k, generator=g) / k ** 0.5
            tensors[key + ".lora_B.weight"] = torch.randn(n, r, generator=g) * 0.01
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = dict(peft_type="LORA", r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS), bias="none",
                  target_parameters=["gate_up_proj", "down_proj"] if experts else None)
    (out / "adapter_config.json").write_text(json.dumps(config))
    return str(out)


def step_time(llm: LLM, batch: int, tokens: int, loras: list, seed: int) -> float:
    """Seconds per engine step for one batch (fresh prompts: no prefix-cache hit)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(SIZES["vocab_size"]) for _ in range(16)] for _ in range(batch)]
    steps = 0
    step = llm.engine.step

    def counted():
        nonlocal steps
        steps += 1
        return step()

    llm.engine.step = counted
    try:
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True), use_tqdm=False,
                     lora_request=loras)
        return (time.perf_counter() - t0) / steps
    finally:
        llm.engine.step = step


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--experts", action="store_true", help="adapters on the routed experts too")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = str(make_tiny_model(Path(tmp) / "base", "qwen3_moe", dtype="float32", **SIZES))
        reqs = [LoRARequest(f"a{i}", i + 1, write_adapter(Path(tmp) / f"a{i}", args.rank, i, args.experts))
                for i in range(8)]
        llm = LLM(base, dtype="float32", enable_lora=True, max_loras=8, max_lora_rank=args.rank, max_cpu_loras=8,
                  max_num_seqs=args.batch, num_kv_blocks=args.batch * 8 + 8, block_size=16)
        try:
            cases = {"0": [None] * args.batch, "1": [reqs[0]] * args.batch,
                     "8": [reqs[i % 8] for i in range(args.batch)]}
            for loras in cases.values():  # warm-up: adapters read, slots filled, kernels run once
                step_time(llm, args.batch, 4, loras, seed=99)
            times = {k: statistics.median(step_time(llm, args.batch, args.tokens, v, seed=s) for s in range(5))
                     for k, v in cases.items()}
        finally:
            llm.shutdown()
    result = dict(device=str(llm.engine.config.device), threads=torch.get_num_threads(), batch=args.batch,
                  rank=args.rank, tokens=args.tokens, experts=args.experts, sizes=SIZES,
                  step_ms={k: round(v * 1e3, 3) for k, v in times.items()},
                  ratio={k: round(v / times["0"], 3) for k, v in times.items()})
    print(json.dumps(result, indent=1))
    if args.out:
        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
