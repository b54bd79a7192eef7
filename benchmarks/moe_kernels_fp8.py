"""FP8 block-scaled fused MoE vs the bf16 one, side by side at the same shapes (`moe_kernels --dtype fp8`).

    python -m moelink.benchmarks.moe_kernels --dtype fp8 [--shapes deepseek-v3,qwen3-30b-a3b] [--tokens ...]

For each shape and token count, the same inputs (x in bf16, softmax top-k routing) go through
- "bf16": triton_moe.triton_fused_moe with bf16 expert weights, and
- "fp8": triton_moe_fp8.triton_fused_moe_fp8 with those weights block-quantized (128 x 128, the published
  layout), activations quantized per token group on the fly (W8A8),
both timed the same way as moe_kernels (CUDA-graph replay, L2 flushed, inputs rotated, median), one after the
other within the same token count, so the ratio bf16_ms / fp8_ms is measured side by side. Bytes touched count
the fp8 weights at 1 byte (+ scales), so GB/s and the copy-bandwidth fraction compare with bf16's directly.
At decode sizes the tiny GEMVs of both formats are timed too: "bf16-tiny", "fp8-tiny" (x quantized by the MoE's
own launch, h in the gate-up launch: three), "fp8-tiny-2launch" (x quantized beforehand, as the norm before the MoE
does it in the engine: two; summary.speedup_fp8_tiny, issue 80's row).
Correctness per point: fp8 against fp8.reference_fused_moe_fp8 (same quantized weights; up to 1024 tokens),
and the fp8 output's distance from the bf16 one (the quantization's own effect) is reported.
"""
from __future__ import annotations

import math
import statistics

import torch

FP8_SHAPES = ("deepseek-v3", "qwen3-30b-a3b")  # the published FP8 MoE checkpoints (DeepSeek-V3/R1, Qwen3-30B-A3B-FP8)
CHECK_MAX_TOKENS = 1024
TINY_MAX_PAIRS = 512  # the tiny GEMVs (both formats) timed up to this many pairs, as moe_kernels times bf16's


def quantize_experts(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] bf16 → (fp8 [E, N, K], scales [E, ceil(N/128), ceil(K/128)]), one expert at a time: an fp32 copy of
    all of DeepSeek-V3's experts would not fit beside them."""
    from moelink.kernels.fp8 import block_quantize, block_scale_shape

    E, N, K = w.shape
    wq = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device=w.device)
    ws = torch.empty(E, *block_scale_shape(N, K), device=w.device)
    for e in range(E):
        wq[e], ws[e] = block_quantize(w[e])
    return wq, ws


def _inputs(E, K, D, T, device, gen, n_sets):
    """n_sets of (x bf16, topk weights, topk ids) from softmax top-k of random logits, as moe_kernels draws them
    (not imported from it: moe_kernels imports this module)."""
    sets = []
    for _ in range(n_sets):
        x = torch.randn(T, D, generator=gen, device=device).to(torch.bfloat16)
        tw, ti = torch.topk(torch.softmax(torch.randn(T, E, generator=gen, device=device), -1), K, dim=-1)
        sets.append((x, (tw / tw.sum(-1, keepdim=True)).float(), ti))
    return sets


def bench_fp8_shape(name, shape, tokens, device, timer, ceilings, iters, check, graphs) -> list[dict]:
    from moelink.kernels.fp8 import per_token_group_quant, reference_fused_moe_fp8
    from moelink.kernels.triton_moe import triton_fused_moe
    from moelink.kernels.triton_moe_fp8 import triton_fused_moe_fp8

    E, K, D, I = shape
    gen = torch.Generator(device=device).manual_seed(0)
    warmup = 3 if device.type == "cuda" else 1
    # Fan-in-scaled, drawn in bf16 and scaled in place (DeepSeek-V3's experts are 22 GB in bf16).
    w13 = torch.randn(E, 2 * I, D, generator=gen, device=device, dtype=torch.bfloat16).mul_(1 / math.sqrt(D))
    w2 = torch.randn(E, D, I, generator=gen, device=device, dtype=torch.bfloat16).mul_(1 / math.sqrt(I))
    w13q, w13s = quantize_experts(w13)
    w2q, w2s = quantize_experts(w2)
    scale_bytes = (w13s.numel() + w2s.numel()) * 4 / E
    systems = {
        "bf16": (lambda x, tw, ti: triton_fused_moe(x, w13, w2, tw, ti), 2, 0.0),
        "fp8": (lambda x, tw, ti: triton_fused_moe_fp8(x, w13q, w13s, w2q, w2s, tw, ti), 1, scale_bytes),
        # the tiny GEMVs of both formats forced (kernels/triton_moe_tiny.py, triton_moe_fp8_tiny.py), at decode sizes
        "bf16-tiny": (lambda x, tw, ti: triton_fused_moe(x, w13, w2, tw, ti, path="tiny"), 2, 0.0),
        "fp8-tiny": (lambda x, tw, ti: triton_fused_moe_fp8(x, w13q, w13s, w2q, w2s, tw, ti, path="tiny"), 1,
                     scale_bytes),
        # issue 80's two-launch form: x as the norm before the MoE quantized it (add_rms_norm_fp8, in the norm's own
        # launch: not timed here, engine_decode's step has it), h quantized in the gate-up launch
        "fp8-tiny-2launch": (lambda x, tw, ti: triton_fused_moe_fp8(x, w13q, w13s, w2q, w2s, tw, ti, path="tiny",
                                                                    x_fp8=prequant[id(x)]), 1, scale_bytes),
    }
    prequant: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    for T in tokens:
        n_sets = max(2, min(8, (512 << 20) // max(1, T * D * 2))) if device.type == "cuda" else 2
        sets = _inputs(E, K, D, T, device, gen, n_sets)
        prequant.clear()
        prequant.update({id(x): per_token_group_quant(x) for x, _, _ in sets})
        touched = statistics.mean(int(torch.unique(s[2]).numel()) for s in sets)
        flops = 6.0 * T * K * D * I
        times, outs, by_sys = {}, {}, {}
        for sys_name, (fn, welem, sbytes) in systems.items():
            if "-tiny" in sys_name and T * K > TINY_MAX_PAIRS:
                continue
            outs[sys_name] = fn(*sets[0]).float()
            t_eager = timer(fn, sets, iters=iters, warmup=warmup)
            t_graph = timer.graph(fn, sets, iters=iters) if graphs else None
            t = t_graph or t_eager
            times[sys_name] = t
            bytes_ = touched * (3 * D * I * welem + sbytes) + 2 * T * D * 2
            row = dict(shape=name, E=E, K=K, D=D, I=I, tokens=T, system=sys_name, median_ms=t * 1e3,
                       eager_ms=t_eager * 1e3, graph_ms=None if t_graph is None else t_graph * 1e3,
                       TFLOPs=flops / t / 1e12, GBps=bytes_ / t / 1e9, bytes=bytes_, experts_touched=touched)
            row["frac_copy_bw"] = row["GBps"] / ceilings["copy_GBps"]
            row["frac_matmul_bf16"] = row["TFLOPs"] / ceilings["matmul_TFLOPs"]
            rows.append(row)
            by_sys[sys_name] = row
        fp8_row = by_sys["fp8"]
        fp8_row["speedup_vs_bf16"] = times["bf16"] / times["fp8"]
        for tiny in ("fp8-tiny", "fp8-tiny-2launch"):  # (issue 80: >= 1.6x bf16 at <= 64 tokens)
            if tiny in by_sys:
                by_sys[tiny]["speedup_vs_bf16"] = times["bf16"] / times[tiny]
                by_sys[tiny]["speedup_vs_bf16_tiny"] = times["bf16-tiny"] / times[tiny]
        fp8_row["rel_diff_vs_bf16"] = float((outs["fp8"] - outs["bf16"]).norm() / outs["bf16"].norm())
        if check and T <= CHECK_MAX_TOKENS:
            x, tw, ti = sets[0]
            want = reference_fused_moe_fp8(x.float(), w13q, w13s, w2q, w2s, tw, ti)
            err = float((outs["fp8"] - want).norm() / want.norm())
            if not err <= 1e-2:  # a NaN fails too
                raise AssertionError(f"fp8 {name} T={T}: relative error {err:.3g} against reference_fused_moe_fp8")
            fp8_row["rel_err_vs_reference"] = err
            for tiny in ("fp8-tiny", "fp8-tiny-2launch"):
                if tiny in outs:
                    err = float((outs[tiny] - want).norm() / want.norm())
                    if not err <= 1e-2:
                        raise AssertionError(f"{tiny} {name} T={T}: relative error {err:.3g} against the reference")
                    by_sys[tiny]["rel_err_vs_reference"] = err
        print(f"{name:>14} T={T:>5} bf16 {times['bf16'] * 1e3:9.3f} ms  fp8 {times['fp8'] * 1e3:9.3f} ms  "
              f"bf16/fp8 {fp8_row['speedup_vs_bf16']:5.2f}x  fp8 {fp8_row['GBps']:7.0f} GB/s "
              f"({100 * fp8_row['frac_copy_bw']:5.1f}% copy) {fp8_row['TFLOPs']:7.1f} TFLOP/s  "
              f"|fp8-bf16|/|bf16| {fp8_row['rel_diff_vs_bf16']:.3g}", flush=True)
        del sets, outs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del w13, w2, w13q, w2q
    return rows


def summarize_fp8(rows) -> dict:
    sp = [r["speedup_vs_bf16"] for r in rows if r["system"] == "fp8"]
    by_shape = {}
    for r in rows:
        if r["system"] == "fp8":
            by_shape.setdefault(r["shape"], {})[str(r["tokens"])] = round(r["speedup_vs_bf16"], 3)
    forms: dict[str, dict] = {"fp8-tiny": {}, "fp8-tiny-2launch": {}}
    for r in rows:
        if r["system"] in forms:
            forms[r["system"]].setdefault(r["shape"], {})[str(r["tokens"])] = dict(
                vs_bf16=round(r["speedup_vs_bf16"], 3), vs_bf16_tiny=round(r["speedup_vs_bf16_tiny"], 3))
    # speedup_fp8_tiny: the tiny path as the engine runs it for its input (x quantized by the norm: two launches);
    # _3launch: x quantized by the MoE's own launch (a caller without the norm's copy). The four-launch form before
    # issue 80's (h quantized apart too) is the last leases' fp8-tiny rows (1.14-1.17x at one token).
    return dict(geomean_speedup_fp8_vs_bf16=math.exp(statistics.mean(map(math.log, sp))) if sp else None,
                speedup_fp8_vs_bf16=by_shape, speedup_fp8_tiny=forms["fp8-tiny-2launch"],
                speedup_fp8_tiny_3launch=forms["fp8-tiny"])
