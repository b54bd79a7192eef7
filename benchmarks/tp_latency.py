"""Batch-1 decode latency at TP 1 / 2 / 4 / 8 on one node: the GPU measurement tensor parallelism is for.

    python -m moelink.benchmarks.tp_latency --model DIR [--tp 1,2,4,8] [--ep 1] [--device cuda] [--tokens 64]
        [--load-format dummy] [--out benchmarks/results/tp_latency_<gpu>.json]
    python -m moelink.benchmarks.tp_latency --cpu-smoke      # a tiny Qwen3-MoE at TP 2 on CPU ranks (Ray, gloo)

For each TP size the engine serves one request of a 128-token prompt twice, once for 1 new token and once for
`--tokens`: (t_tokens - t_1) / (tokens - 1) is the time per decode step at batch 1 as a user sees it (host work,
the collectives, the sampling included), beside the tokens per second it gives. `--ep W` runs each TP size with the
experts in EP over W ranks (a multiple of the TP size) instead of split by TP.

Needs a node with as many GPUs as the largest TP size and Ray (the lent single-GPU machines have neither: this is a
multi-GPU node's step, docs/tensor-parallelism.md). On CPU the numbers only check that the script runs.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def _time_generate(llm, prompt: list[int], tokens: int) -> float:
    from moelink.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([prompt], params, use_tqdm=False)
    return time.perf_counter() - t0


def measure(model: str, tp: int, ep: int, device: str, tokens: int, load_format: str, dtype: str) -> dict:
    from moelink.engine import LLM

    llm = LLM(model, tensor_parallel_size=tp, expert_parallel_size=ep, device=device, load_format=load_format,
              dtype=dtype, max_num_seqs=4, enforce_eager=device == "cpu")
    try:
        prompt = list(range(1, 129))
        _time_generate(llm, prompt, 2)  # warm: compiles, first collectives
        one = min(_time_generate(llm, prompt, 1) for _ in range(2))
        many = min(_time_generate(llm, prompt, tokens) for _ in range(2))
    finally:
        llm.engine.shutdown()
    step_s = (many - one) / (tokens - 1)
    return {"tp": tp, "ep": ep, "decode_step_ms": step_s * 1e3, "tokens_per_s": 1.0 / step_s, "ttft_s": one}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tp", default="1,2,4,8")
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--load-format", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", default=None)
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args(argv)
    tps = [int(t) for t in args.tp.split(",")]
    with tempfile.TemporaryDirectory() as d:
        model = args.model
        if args.cpu_smoke:
            from moelink.engine.tools.tiny_model import make_tiny_model

            model = str(make_tiny_model(Path(d), num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2,
                                        num_experts=4, top_k=2, moe_intermediate_size=32, vocab_size=512))
            args.device, args.tokens, args.dtype, tps = "cpu", 3, "float32", [2]
        if model is None:
            ap.error("--model is required (or --cpu-smoke)")
        rows = [measure(model, tp, args.ep, args.device, args.tokens, args.load_format, args.dtype) for tp in tps]
    result = {"benchmark": "tp_latency", "model": args.model or "tiny (cpu smoke)", "device": args.device,
              "tokens": args.tokens, "rows": rows}
    for r in rows:
        print(f"TP {r['tp']} EP {r['ep']}: {r['decode_step_ms']:.2f} ms per decode step at batch 1 "
              f"({r['tokens_per_s']:.1f} tok/s), first token {r['ttft_s'] * 1e3:.0f} ms")
    if args.out:
        from moelink.engine.api.provenance import write_result

        write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
