"""Helpers shared by the Triton kernels: interpreter-safe dot and cast, a flat token's sequence and causal length
(`seq_of_token`, `causal_len`), device checks, workspace allocation.

The Triton CPU interpreter (TRITON_INTERPRET=1, what the CPU test suite runs)
differs from compiled code in two ways that matter for exactness (Triton 3.9):
- fp32 → bf16 casts truncate instead of rounding to nearest even;
- tl.dot on bf16 operands computes garbage;
- fp32 → fp8 e4m3 casts mis-round (ties away from zero, subnormals, and a mantissa that rounds up past
  1.111 does not carry into the exponent: -31.03 becomes -16): `to_fp8` builds the code itself there.
Kernels take an INTERPRET constexpr (True for CPU tensors) and go through
`cast` and `dot` below, which emulate the GPU's numerics there and compile
to the plain instructions on a GPU.
"""
from __future__ import annotations

import functools
import json

import torch
import triton
import triton.language as tl

from . import moe_config

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def to_fp8(x, INTERPRET: tl.constexpr):
    """fp32 x with |x| <= 448 → float8_e4m3fn, round to nearest even (also in the interpreter)."""
    if INTERPRET:
        a = tl.abs(x)
        ab = a.to(tl.uint32, bitcast=True)
        # Normals (|x| >= 2^-6): keep 3 of fp32's 23 mantissa bits, nearest even; a carry moves the exponent.
        rn = ((ab + (0x7FFFF + ((ab >> 20) & 1))) & 0xFFF00000).to(tl.float32, bitcast=True)
        # Subnormals are multiples of 2^-9: an fp32 add at 2^14 (whose ulp is 2^-9) rounds to them, nearest even.
        sub = (a + 16384.0) - 16384.0
        y = tl.where(a >= 0.015625, rn, sub)
        yb = y.to(tl.uint32, bitcast=True)
        # e4m3fn code: exponent field = fp32 exponent - 127 + 7; below 2^-6 the code is y / 2^-9 (8 → 2^-6 exactly).
        code = tl.where(y >= 0.015625, (((yb >> 23) - 120) << 3) | ((yb >> 20) & 7), (y * 512.0).to(tl.uint32))
        code = code | ((x.to(tl.uint32, bitcast=True) >> 24) & 0x80)
        return code.to(tl.uint8).to(tl.float8e4nv, bitcast=True)
    return x.to(tl.float8e4nv)


@triton.jit
def cast(x, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """x.to(dtype), rounding to nearest even in the interpreter too."""
    if INTERPRET:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
        if dtype == tl.float8e4nv:
            return to_fp8(x.to(tl.float32), INTERPRET)
    return x.to(dtype)


@triton.jit
def dot(a, b, acc, INTERPRET: tl.constexpr, PREC: tl.constexpr):
    """acc + a @ b with fp32 accumulation; bf16/fp16 products are exact in fp32, so
    widening first (interpreter only) gives what a tensor-core MMA gives.

    In the interpreter the tile product is element-wise products summed over K by numpy's reduction, not
    `tl.dot` (numpy's matmul, i.e. the host BLAS): the BLAS picks its micro-kernel by the CPU (OpenBLAS's
    DYNAMIC_ARCH, `OPENBLAS_CORETYPE`), and some (Haswell's, on AVX2 machines) round an output row by where it
    falls in the tile, which a tensor-core MMA never does. A reduction over K alone keeps each output element's
    arithmetic to its own row and column on any CPU, so what the interpreter shows of a kernel's invariance is
    the kernel's own tile order and split (issue 82)."""
    if INTERPRET:
        prod = a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :]
        return acc + tl.sum(prod, axis=1)
    return acc + tl.dot(a, b, input_precision=PREC)


@triton.jit
def activation_epilogue(acc_g, acc_u, alpha, limit, ACT: tl.constexpr):
    """The gated activation of the MoE gate-up epilogues on fp32 values (same math as `MoEActivation`):
    ACT 0 SiLU(gate)·up, 1 gpt-oss's clamped swiglu_oai, 2 DeepSeek-V4's silu_clamp, 3 Nemotron-H's ungated
    relu2: relu(up)^2, the gate half not read."""
    if ACT == 3:  # relu2
        r = tl.maximum(acc_u, 0.0)
        return r * r
    if ACT == 2:  # silu_clamp: SiLU(min(gate, limit)) * clamp(up, -limit, limit)
        g = tl.minimum(acc_g, limit)
        return g / (1.0 + tl.exp(-g)) * tl.minimum(tl.maximum(acc_u, -limit), limit)
    if ACT == 1:  # swiglu_oai: gate clamped above, up clamped both ways, (up + 1) * gate * sigmoid(alpha * gate)
        g = tl.minimum(acc_g, limit)
        u = tl.minimum(tl.maximum(acc_u, -limit), limit)
        return (u + 1.0) * (g / (1.0 + tl.exp(-alpha * g)))
    return acc_g / (1.0 + tl.exp(-acc_g)) * acc_u


@triton.jit
def seq_of_token(qsl_ptr, num_seqs, tok):
    """The sequence of flat token `tok`: the first s whose queries end after it (binary search over query_start_loc,
    device only); num_seqs past the batch's last token."""
    lo = tok * 0  # int32 tensors from the start: loop-carried
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid + 1) <= tok:
            lo = mid + 1
        else:
            hi = mid
    return lo


@triton.jit
def causal_len(qsl_ptr, seq_lens_ptr, s_idx, tok):
    """How many rows flat token `tok` of sequence s_idx sees: its position + 1 (causal)."""
    q_start = tl.load(qsl_ptr + s_idx)
    q_len = tl.load(qsl_ptr + s_idx + 1) - q_start
    return tl.load(seq_lens_ptr + s_idx) - q_len + (tok - q_start) + 1


@triton.jit
def _probe_kernel(x_ptr):
    tl.store(x_ptr, 0)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to TF32: the fp32 tests hold 1e-5.
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting(t: torch.Tensor) -> bool:
    """Kernels run in the interpreter exactly when their tensors are on the CPU."""
    if t.device.type == "cuda":
        return False
    if type(_probe_kernel).__name__ != "InterpretedFunction":
        raise ValueError(
            f"tensor device={t.device} is invalid for the Triton kernels: CPU tensors need TRITON_INTERPRET=1 set "
            "before moelink.kernels' Triton modules are imported (or use the reference kernels on CPU)."
        )
    return True


@functools.lru_cache(maxsize=16)
def _config_section(config: str, section: str) -> dict:
    return json.loads((moe_config.CONFIG_DIR / f"{config}.json").read_text())[section]


def launch_config(config: str, kind: str, t: torch.Tensor) -> dict:
    """The launch config of kernel `kind` in kernels/configs/`config`.json for kernels on t's device: its
    'interpreter' section for CPU tensors (the interpreter), else its 'gpu' section. A copy: callers add to it."""
    return dict(_config_section(config, "interpreter" if interpreting(t) else "gpu")[kind])


def check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}.dtype={t.dtype} is not supported by the Triton kernels: use float32, bfloat16 or float16 "
                         "(the reference kernels take float64).")


def workspace(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer the Triton wrappers allocate comes from here, so tests can poison it with NaN."""
    return torch.empty(shape, dtype=dtype, device=device)


def out_buffer(out: torch.Tensor | None, name: str, shape: tuple, dtype: torch.dtype, device) -> torch.Tensor:
    """A kernel's output: the caller's buffer `out` (checked: contiguous, `shape`, `dtype`), or a workspace."""
    if out is None:
        return workspace(shape, dtype, device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"{name} {tuple(out.shape)} {out.dtype} is invalid: must be contiguous {tuple(shape)} {dtype}.")
    return out
