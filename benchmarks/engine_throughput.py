"""Offline throughput: moelink vs `transformers` on the same seeded workload, measured in one run.

    python -m moelink.benchmarks.engine_throughput [--num-requests 128] [--out benchmarks/results/...]

Workload: N requests, prompts of 32–512 random tokens, 16–128 output tokens
each (EOS ignored so every system produces exactly the same amount), greedy.
Model: a random Qwen3-MoE checkpoint (4 layers, hidden 256, 16 experts,
top-4), float32. On CPU unless a GPU is present.

Systems:
- moelink `LLM.generate` (continuous batching, chunked prefill, paged KV).
- transformers `generate`, left-padded static batches of 16; each batch runs
  to its longest request, so tokens past a request's own length are waste.
  "useful" counts only the tokens each request asked for.
- transformers continuous batching (`generate_batch`), when it runs on this
  device; it takes one max_new_tokens for all, so it gets the longest (128)
  and we count every token it generated (flattering to it).
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm
from moelink.engine.api.provenance import git_commit as _commit

MODEL_KW = dict(arch="qwen3_moe", num_layers=4, hidden_size=256, num_experts=16, top_k=4, num_heads=8,
                num_kv_heads=2, head_dim=32, moe_intermediate_size=256, vocab_size=1024,
                max_position_embeddings=1024)


def workload(n: int, seed: int, vocab: int):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(32, 512))] for _ in range(n)]
    outs = [rng.randint(16, 128) for _ in range(n)]
    return prompts, outs


def run_moelink(path, prompts, outs, device):
    from moelink.engine import LLM, SamplingParams

    # Engine defaults (vLLM's): max_num_seqs 256, max_num_batched_tokens 8192.
    llm = LLM(path, dtype="float32", device=device)
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    produced = sum(len(r.outputs[0].token_ids) for r in res)
    assert produced == sum(outs)
    return dict(system="moelink", seconds=dt, useful_tokens=produced, generated_tokens=produced)


def run_hf_static(path, prompts, outs, device, batch=16):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    gen_tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            ps, os_ = prompts[i : i + batch], outs[i : i + batch]
            L = max(map(len, ps))
            ids = torch.zeros(len(ps), L, dtype=torch.long)
            mask = torch.zeros(len(ps), L, dtype=torch.long)
            for j, p in enumerate(ps):  # left padding, as decoder-only generation needs
                ids[j, L - len(p):] = torch.tensor(p)
                mask[j, L - len(p):] = 1
            n_new = max(os_)
            out = model.generate(ids.to(device), attention_mask=mask.to(device), do_sample=False, max_new_tokens=n_new,
                                 min_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
            gen_tokens += (out.shape[1] - L) * len(ps)
    dt = time.perf_counter() - t0
    return dict(system=f"transformers generate (padded batches of {batch})", seconds=dt,
                useful_tokens=sum(outs), generated_tokens=gen_tokens)


def run_hf_continuous(path, prompts, outs, device):
    """transformers generate_batch (continuous batching)"""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").to(device).eval()
    cfg = GenerationConfig(max_new_tokens=max(outs), do_sample=False, eos_token_id=-1, pad_token_id=0)
    t0 = time.perf_counter()
    res = model.generate_batch(inputs=prompts, generation_config=cfg, progress_bar=False)
    dt = time.perf_counter() - t0
    # Request ids end in the prompt's index ("req_12"); map them back to the requested lengths.
    by_index = {int("".join(ch for ch in rid if ch.isdigit()) or i): r for i, (rid, r) in enumerate(res.items())}
    generated = sum(len(r.generated_tokens) for r in by_index.values())
    useful = sum(min(len(r.generated_tokens), outs[i]) for i, r in by_index.items() if i < len(outs))
    return dict(system="transformers generate_batch (continuous batching)", seconds=dt,
                useful_tokens=useful, generated_tokens=generated)



def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-hf-continuous", action="store_true")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/engine_throughput_<device>.json)")
    args = ap.parse_args(argv)
    from moelink.engine.tools.tiny_model import make_tiny_model

    prompts, outs = workload(args.num_requests, args.seed, MODEL_KW["vocab_size"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = str(make_tiny_model(tmp, **MODEL_KW))
        runs = [run_moelink, run_hf_static] + ([] if args.skip_hf_continuous else [run_hf_continuous])
        # One bar step per system (outside the timed regions).
        for run in tqdm(runs, desc="systems", unit="system"):
            try:
                rows.append(run(path, prompts, outs, args.device))
            except Exception as exc:  # report, don't hide: e.g. a system that does not run on this device
                if run is run_moelink:
                    raise
                rows.append(dict(system=run.__doc__ or run.__name__, error=f"{type(exc).__name__}: {exc}"[:300]))
    base = rows[0]["useful_tokens"] / rows[0]["seconds"]
    print(f"\n{args.num_requests} requests, prompts 32-512, outputs 16-128 ({sum(outs)} output tokens), "
          f"model {MODEL_KW['num_layers']}L h{MODEL_KW['hidden_size']} E{MODEL_KW['num_experts']} top{MODEL_KW['top_k']} fp32, "
          f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| system | wall s | useful output tok/s | generated tok/s | moelink speed-up |\n|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['system']} | — | — | — | did not run: {r['error'][:120]} |")
            continue
        r["useful_tok_s"] = r["useful_tokens"] / r["seconds"]
        r["generated_tok_s"] = r["generated_tokens"] / r["seconds"]
        r["moelink_speedup"] = base / r["useful_tok_s"]
        print(f"| {r['system']} | {r['seconds']:.1f} | {r['useful_tok_s']:.0f} | {r['generated_tok_s']:.0f} | {r['moelink_speedup']:.2f}x |")
    result = dict(benchmark="engine_throughput", date=str(date.today()), commit=_commit(), device=args.device,
                  device_name=torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
                  torch=torch.__version__, threads=torch.get_num_threads(), model=MODEL_KW,
                  num_requests=args.num_requests, seed=args.seed, rows=rows)
    out = Path(args.out or Path(__file__).parent / "results" / f"engine_throughput_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
