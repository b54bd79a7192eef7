"""Run metadata and GPU timing shared by the kernel benchmarks (moe_kernels.py, tune_moe.py, engine_decode.py,
moe_mxfp4.py): device label and provenance, the CUDA-event Timer (L2 flushed, inputs rotated, CUDA-graph
replays) and the copy / matmul ceilings measured in the same run. moe_kernels re-exports every name here."""
from __future__ import annotations

import statistics
import sys
import time
from datetime import date

import torch
from moelink.engine.api.provenance import git_commit as commit


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def run_meta(device: torch.device) -> dict:
    import triton

    return dict(device=device_label(device), date=str(date.today()), commit=commit(), torch=torch.__version__,
                triton=triton.__version__, python=sys.version.split()[0])


def require_cuda(script: str) -> torch.device:
    if not torch.cuda.is_available():
        sys.exit(f"{script}: no CUDA GPU is visible; this benchmark measures GPU kernels "
                 "(run it on a GPU machine, or pass --cpu-smoke to check the script on CPU).")
    return torch.device("cuda", torch.cuda.current_device())


class Timer:
    """Median of per-iteration times: CUDA events on a GPU (L2 flushed before each), wall clock on CPU."""

    def __init__(self, device: torch.device, flush_bytes: int = 256 << 20):
        self.device = device
        self.flush = torch.empty(flush_bytes // 4, dtype=torch.int32, device=device) if device.type == "cuda" else None

    def __call__(self, fn, arg_sets, iters: int = 30, warmup: int = 3) -> float:
        """Seconds (median); fn(*arg_sets[i % len(arg_sets)]) per iteration. Warm-up: at least one call per input
        set, none with warmup=0 (the CPU smokes: the interpreter compiles nothing, and their times mean nothing)."""
        for i in range(max(warmup, len(arg_sets)) if warmup else 0):
            fn(*arg_sets[i % len(arg_sets)])
        times = []
        for i in range(iters):
            args = arg_sets[i % len(arg_sets)]
            if self.flush is None:
                t0 = time.perf_counter()
                fn(*args)
                times.append(time.perf_counter() - t0)
                continue
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()  # host sync: only to read this iteration's time
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)


    def graph(self, fn, arg_sets, iters: int = 30) -> float | None:
        """Median time of CUDA-graph replays (one graph per input set): the kernels without host launch
        overhead, as a decode engine with graphs runs them. None on CPU or when fn cannot be captured
        (it syncs with the host)."""
        if self.flush is None:
            return None
        graphs = []
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for args in arg_sets:  # warm-up outside capture (Triton compiles, allocator settles)
                    fn(*args)
            torch.cuda.current_stream().wait_stream(side)
            for args in arg_sets:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    fn(*args)
                graphs.append(g)
        except RuntimeError as e:
            print(f"  (no CUDA graph: {str(e).splitlines()[0][:100]})")
            return None
        return self(lambda g: g.replay(), [(g,) for g in graphs], iters=iters, warmup=len(graphs))


def measure_ceilings(device: torch.device, timer: Timer) -> dict:
    """Copy bandwidth (GB/s, read + write) and dense bf16 matmul TFLOP/s, measured now."""
    n = (2 << 30) if device.type == "cuda" else (64 << 20)
    # On CPU (the --cpu-smoke runs, whose times mean nothing) 3 timed runs, not 20: 0.64 -> ~0.1 s of CPU a run.
    iters = 20 if device.type == "cuda" else 3
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    t_copy = timer(lambda: dst.copy_(src), [()], iters=iters)
    m = 8192 if device.type == "cuda" else 512
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    t_mm = timer(lambda: a @ b, [()], iters=iters)
    return dict(copy_GBps=2 * n / t_copy / 1e9, matmul_TFLOPs=2 * m**3 / t_mm / 1e12, copy_bytes=n, matmul_n=m)
