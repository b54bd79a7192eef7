"""One engine's offline run for benchmarks/peer_vllm.py, in its own process: `LLM.generate` on given token ids.

    PYTHON benchmarks/peer/offline_worker.py --engine moelink|vllm --model DIR --spec SPEC.json --out OUT.json

Run by moelink's python (--engine moelink) or by the peer venv's (--engine vllm), so it imports nothing of moelink's
at the top and nothing outside the standard library but the engine it runs. SPEC.json: {"prompts": [[ids], ...],
"warmup_prompts": [[ids], ...], "max_tokens",
"batch1": how many of the prompts go one at a time, "dtype", "max_model_len", "max_num_seqs"}. Each phase is
warmed once untimed (vLLM compiles at start and its first shapes; moelink warms its kernels), then timed:
  batch1: the first `batch1` prompts, one generate call each (sequential requests);
  full:   every prompt in one generate call (a full batch).
OUT.json: seconds and output tokens per phase, load seconds, and the token ids each prompt generated (greedy).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import time


def make_llm(engine: str, model: str, spec: dict):
    if engine == "vllm":  # the peer's venv alone has it (imported by name: not a dependency of this package)
        vllm = importlib.import_module("vllm")
        llm = vllm.LLM(model=model, dtype=spec["dtype"], max_model_len=spec["max_model_len"],
                       max_num_seqs=spec["max_num_seqs"], seed=0, disable_log_stats=True)
        sampling = vllm.SamplingParams
    else:
        from moelink.engine import LLM, SamplingParams
        llm = LLM(model=model, dtype=spec["dtype"], max_model_len=spec["max_model_len"],
                  max_num_seqs=spec["max_num_seqs"])
        sampling = SamplingParams
    params = sampling(max_tokens=spec["max_tokens"], temperature=0.0, ignore_eos=True)
    return llm, params


def token_prompts(engine: str, prompts: list[list[int]]) -> list:
    if engine == "vllm":
        tokens_prompt = importlib.import_module("vllm.inputs").TokensPrompt
        return [tokens_prompt(prompt_token_ids=p) for p in prompts]
    return [{"prompt_token_ids": p} for p in prompts]


def run(engine: str, model: str, spec: dict) -> dict:
    t0 = time.perf_counter()
    llm, params = make_llm(engine, model, spec)
    load_s = time.perf_counter() - t0
    prompts = token_prompts(engine, spec["prompts"])
    warm = token_prompts(engine, spec["warmup_prompts"])
    n1 = spec["batch1"]

    def gen(batch):
        return llm.generate(batch, params, use_tqdm=False)

    # Warm-up on other prompts (nothing timed may hit the prefix cache): one request alone, one full batch.
    gen(warm[:1])
    gen(warm)

    t = time.perf_counter()
    single = [gen([p])[0] for p in prompts[:n1]]
    batch1_s = time.perf_counter() - t

    t = time.perf_counter()
    full = gen(prompts)
    full_s = time.perf_counter() - t

    def ids(out) -> list[int]:
        return [int(x) for x in out.outputs[0].token_ids]

    batch1_tokens = sum(len(ids(o)) for o in single)
    full_tokens = sum(len(ids(o)) for o in full)
    return {
        "engine": engine, "pid": os.getpid(), "load_s": round(load_s, 3), "dtype": spec["dtype"],
        "batch1": {"requests": n1, "seconds": round(batch1_s, 4), "output_tokens": batch1_tokens,
                   "output_tok_s": round(batch1_tokens / batch1_s, 2)},
        "full": {"requests": len(prompts), "seconds": round(full_s, 4), "output_tokens": full_tokens,
                 "output_tok_s": round(full_tokens / full_s, 2)},
        "outputs_batch1": [ids(o) for o in single],
        "outputs_full": [ids(o) for o in full],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=("moelink", "vllm"), required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--spec", required=True)
    ap.add_argument("--out", required=True)
    ns = ap.parse_args()
    with open(ns.spec) as f:
        spec = json.load(f)
    result = run(ns.engine, ns.model, spec)
    with open(ns.out, "w") as f:
        json.dump(result, f)
    print(f"{ns.engine}: batch1 {result['batch1']['output_tok_s']} tok/s, "
          f"full {result['full']['output_tok_s']} tok/s (load {result['load_s']} s)", flush=True)


if __name__ == "__main__":
    main()
