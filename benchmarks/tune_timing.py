"""Timing one launch config of a fused MoE for the tuners (benchmarks/tune_moe.py, tune_moe_fp8.py): median
seconds, or inf for a candidate that fails in any way or computes something else; a CUDA fault that poisons the
context stops the run (CudaFault)."""
from __future__ import annotations

import json


class CudaFault(RuntimeError):
    """A CUDA error that leaves the context unusable: nothing after it can be measured."""


def _is_cuda_fault(e: BaseException) -> bool:
    msg = str(e)
    return type(e).__name__ == "AcceleratorError" or "CUDA error" in msg or "illegal memory access" in msg


def time_config(cfg, sets, timer, iters, want=None) -> float:
    """Median seconds of `cfg`; inf if it fails for any reason or (with `want`, the per-expert loop's output on
    sets[0]) computes something else: a fast wrong config must never be written. The reason is printed."""
    from moelink.kernels.triton_moe import triton_fused_moe

    fn = lambda x, w13, w2, tw, ti: triton_fused_moe(x, w13, w2, tw, ti, config=cfg)  # noqa: E731
    return time_call(fn, cfg, sets, timer, iters, want)


def time_call(fn, cfg, sets, timer, iters, want=None, tol: float = 2e-2) -> float:
    """time_config's body for any fused MoE `fn` launched with `cfg` (tune_moe_fp8 times the FP8 one through it):
    median seconds, inf on any failure or a relative error above `tol` against `want`."""
    try:
        if want is not None:
            err = float((fn(*sets[0]).float() - want).norm() / want.norm())
            if not err <= tol:  # a NaN fails too
                print(f"  skipped {json.dumps(cfg.to_dict())}: relative error {err:.3g} against the per-expert loop")
                return float("inf")
        # (no warm-up call on CPU, the smokes: the interpreter compiles nothing, and its times mean nothing)
        on_cpu = getattr(getattr(sets[0][0], "device", None), "type", None) == "cpu"
        return timer(fn, sets, iters=iters, warmup=0 if on_cpu else 1)
    except Exception as e:  # noqa: BLE001 - any failure skips the candidate (compile errors come in many types)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        if _is_cuda_fault(e):
            raise CudaFault(f"{type(e).__name__}: {first} (config {json.dumps(cfg.to_dict())})") from e
        print(f"  skipped {json.dumps(cfg.to_dict())}: {type(e).__name__}: {first}")
        return float("inf")


