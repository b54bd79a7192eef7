"""fp8 vs bf16 latent KV cache for MLA on long prompts (issue 27): the MLA attention kernel alone and
`LLM.generate` end to end, at DeepSeek-V2-Lite's shape, each with its fp8 / bf16 time ratio. GPU only.

    python -m moelink.benchmarks.mla_fp8_kv [--quick] [--parts kernel,e2e] [--cpu-smoke]
        [--out benchmarks/results/mla_fp8_kv_<gpu>.json]

Kernel (`triton_mla_attention`, CUDA events, L2 flushed, median): V2-Lite's MLA (16 heads, latent 512, rope
64, 16-token blocks, bf16 queries) over a bf16 cache and an fp8 cache (kv_scale 1) holding the same values:
- prefill: a 7,680-token prompt as one chunk, and its last 2,048-token chunk over the 5,632 rows before it;
- mixed: that chunk beside 63 decodes over 7,680 rows each;
- decode: 64 decodes over 7,680 rows each (the fp8 cache should win here: half the bytes).
End to end: `LLM.generate` with random weights (load_format dummy), V2-Lite's config at 12 layers as in the
issue's measurement, 64 requests of 7,680 prompt tokens and 256 out (--quick: 16 requests, 64 out), greedy,
EOS ignored, after a short warm-up call; --kv-cache-dtype auto (bf16), then fp8, one engine at a time.

Each case prints `RATIO <part> <case>: fp8 <s> s / bf16 <s> s = <fp8/bf16>`. The issue measured the end-to-end
workload at 29.4 s (fp8) against 15.6 s (bf16), 1.88, when every query token of a chunk widened its whole
context from e4m3; since each chunk's context is widened once (kernels/triton_mla_wide.py) the prefill
cases should be near 1 (the bf16 kernel's work plus one widening pass) and decode at most 1. --cpu-smoke: toy
shapes, the kernel in the Triton interpreter and the engine on the reference kernels: checks the script only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from moelink.engine.api.provenance import write_result

from .bench_timing import Timer, require_cuda, run_meta
from .engine_decode import DEEPSEEK_V2_LITE, SMOKE_DSV2

RESULTS = Path(__file__).parent / "results"
E2E_LAYERS = 12  # the issue's measurement
# (heads, latent, rope, block, prompt, chunk, decodes); the smoke's are toy sizes for the interpreter.
KERNEL_SHAPE = dict(N=16, C=512, P=64, L=16, prompt=7680, chunk=2048, decodes=64)
SMOKE_KERNEL_SHAPE = dict(N=2, C=32, P=16, L=16, prompt=48, chunk=16, decodes=2)
E2E = {"full": dict(requests=64, prompt=7680, out=256), "quick": dict(requests=16, prompt=7680, out=64),
       "smoke": dict(requests=2, prompt=40, out=3)}


def _meta(ctx_q: list[tuple[int, int]], L: int, device):
    """AttentionMetadata of sequences (context after this step, query length), blocks laid out one after the other."""
    from moelink.kernels.attention import AttentionMetadata

    tables, first = [], 0
    for ctx, _ in ctx_q:
        n = -(-ctx // L)
        tables.append(list(range(first, first + n)))
        first += n
    M = max(len(t) for t in tables)
    q_lens, seq_lens = [q for _, q in ctx_q], [c for c, _ in ctx_q]
    i32 = dict(dtype=torch.int32, device=device)
    qsl = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), **i32)
    meta = AttentionMetadata(qsl, torch.tensor(seq_lens, **i32), torch.tensor([t + [0] * (M - len(t)) for t in tables], **i32),
                             torch.zeros(sum(q_lens), dtype=torch.long, device=device), q_lens, seq_lens, max(q_lens),
                             max(seq_lens), first)
    return meta, first


def kernel_cases(s: dict) -> dict[str, list[tuple[int, int]]]:
    p, c, d = s["prompt"], s["chunk"], s["decodes"]
    return {f"prefill {p}-token prompt, one chunk": [(p, p)],
            f"prefill last {c}-token chunk over {p - c} rows": [(p, c)],
            f"mixed: that chunk + {d - 1} decodes over {p} rows": [(p, c)] + [(p, 1)] * (d - 1),
            f"decode {d} x {p} rows": [(p, 1)] * d}


def time_kernel(device, smoke: bool, iters: int) -> list[dict]:
    from moelink.kernels.triton_mla import triton_mla_attention

    s = SMOKE_KERNEL_SHAPE if smoke else KERNEL_SHAPE
    N, C, P, L = s["N"], s["C"], s["P"], s["L"]
    timer, rows = Timer(device), []
    for case, ctx_q in kernel_cases(s).items():
        meta, blocks = _meta(ctx_q, L, device)
        T = sum(meta.query_lens)
        g = torch.Generator(device=device).manual_seed(0)
        fp8 = (torch.randn(blocks + 1, L, C + P, generator=g, device=device) * 0.5).to(torch.float8_e4m3fn)
        fp8[-1] = 0  # the null block
        caches = {"bf16": fp8.to(torch.bfloat16), "fp8": fp8}  # the same values in both
        q_lat = torch.randn(T, N, C, generator=g, device=device).to(torch.bfloat16)
        q_pe = torch.randn(T, N, P, generator=g, device=device).to(torch.bfloat16)
        out = torch.empty(T, N, C, dtype=torch.bfloat16, device=device)
        secs = {kv: timer(lambda c: triton_mla_attention(q_lat, q_pe, c, meta, 0.1, 1.0, out=out), [(cache,)],
                          iters=iters, warmup=0 if smoke else 3)  # (the interpreter compiles nothing)
                for kv, cache in caches.items()}
        rows.append(dict(part="kernel", case=case, tokens=T, bf16_s=secs["bf16"], fp8_s=secs["fp8"],
                         ratio=secs["fp8"] / secs["bf16"]))
        _say(rows[-1])
    return rows


def time_e2e(device, mode: str, tmp: Path) -> list[dict]:
    from moelink.engine import LLM, SamplingParams

    from .e2e_setup import write_model_dir

    smoke = mode == "smoke"
    w = E2E[mode]
    hf = SMOKE_DSV2 if smoke else DEEPSEEK_V2_LITE
    layers = hf["num_hidden_layers"] if smoke else E2E_LAYERS
    max_len = w["prompt"] + w["out"] + 16
    path = str(write_model_dir(tmp / "model", hf, layers, max_len))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (w["requests"], w["prompt"]), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=w["out"], ignore_eos=True, detokenize=False)
    secs = {}
    for kv in ("auto", "fp8"):
        kw = dict(dtype="float32" if smoke else "bfloat16", load_format="dummy", kv_cache_dtype=kv,
                  max_model_len=max_len, max_num_seqs=w["requests"], device=device.type)
        with LLM(path, **kw) as llm:
            llm.generate([p[:64] for p in prompts[:2]], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True,
                                                                       detokenize=False), use_tqdm=False)
            t0 = time.perf_counter()
            res = llm.generate(prompts, params, use_tqdm=False)
            secs[kv] = time.perf_counter() - t0
            assert sum(len(r.outputs[0].token_ids) for r in res) == w["requests"] * w["out"]
        print(f"e2e kv_cache_dtype={kv}: {secs[kv]:.3f} s", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    case = f"{w['requests']} requests x {w['prompt']} prompt x {w['out']} out, {layers} layers"
    row = dict(part="e2e", case=case, tokens=w["requests"] * (w["prompt"] + w["out"]), bf16_s=secs["auto"],
               fp8_s=secs["fp8"], ratio=secs["fp8"] / secs["auto"])
    _say(row)
    return [row]


def _say(r: dict) -> None:
    print(f"RATIO {r['part']} {r['case']}: fp8 {r['fp8_s']:.6g} s / bf16 {r['bf16_s']:.6g} s = {r['ratio']:.3f}",
          flush=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the end-to-end workload at 16 requests, 64 out")
    ap.add_argument("--parts", default="kernel,e2e", help="comma-separated: kernel, e2e (default both)")
    ap.add_argument("--iters", type=int, default=20, help="timed kernel calls per case (median)")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/mla_fp8_kv_<gpu>.json)")
    ap.add_argument("--cpu-smoke", action="store_true", help="toy shapes on CPU: checks the script only")
    args = ap.parse_args(argv)
    parts = args.parts.split(",")
    if bad := [p for p in parts if p not in ("kernel", "e2e")]:
        ap.error(f"--parts takes kernel and e2e (got {bad})")
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels are defined
        device = torch.device("cpu")
    else:
        device = require_cuda("mla_fp8_kv")
    result = dict(benchmark="mla_fp8_kv", **run_meta(device), quick=args.quick, cpu_smoke=args.cpu_smoke,
                  kernel_shape=SMOKE_KERNEL_SHAPE if args.cpu_smoke else KERNEL_SHAPE, results=[],
                  issue_before_fix=dict(e2e_fp8_s=29.4, e2e_bf16_s=15.6, ratio=round(29.4 / 15.6, 3)))
    tag = "cpu_smoke" if args.cpu_smoke else result["device"].replace(" ", "_") + ("_quick" if args.quick else "")
    out = args.out or RESULTS / f"mla_fp8_kv_{tag}.json"
    if "kernel" in parts:
        with torch.inference_mode():
            result["results"] += time_kernel(device, args.cpu_smoke, 1 if args.cpu_smoke else args.iters)
        write_result(out, result)  # after each part: a command stopped at its budget keeps what it measured
    if "e2e" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            result["results"] += time_e2e(device, "smoke" if args.cpu_smoke else "quick" if args.quick else "full",
                                          Path(tmp))
    print(f"wrote {write_result(out, result)}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
