"""SiLU(gate) · up in one launch (kernels/silu_mul.py is the contract). Grid (T, I / BLOCK).

Legend: T tokens, I intermediate size.

Numerics: torch's two roundings. SiLU in fp32 as torch's kernel computes it, x / (1 + e^-x) (libdevice's expf,
what torch's CUDA kernel calls; the division correctly rounded), rounded to the activations' dtype; then the
product with up in fp32 (exact for bf16 and fp16 operands) rounded once. torch's CPU SiLU uses its own vector
exp, so the interpreter can sit an ulp of fp32 from torch's CPU result before the rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import triton_common as common
from .triton_common import cast


@triton.jit
def silu_mul_values(g, u, dt: tl.constexpr, INTERPRET: tl.constexpr):
    """SiLU(g) · u of fp32 values already in the activations' dtype `dt`, with torch's two roundings (the module
    docstring), in dt: the decode GEMVs' epilogue (kernels/triton_mlp_gemv.py) is this kernel's arithmetic."""
    e = tl.exp(-g) if INTERPRET else libdevice.exp(-g)  # (the interpreter has no libdevice)
    s = cast(tl.div_rn(g, 1.0 + e), dt, INTERPRET).to(tl.float32)
    return cast(s * u, dt, INTERPRET)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, inter, stride_gt, stride_ut, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter
    dt = out_ptr.dtype.element_ty
    g = tl.load(g_ptr + t * stride_gt + offs, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + t * stride_ut + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * inter + offs, silu_mul_values(g, u, dt, INTERPRET), mask=ok)


def triton_silu_mul(gate_TI: torch.Tensor, up_TI: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as `reference_silu_mul`; gate and up may be strided row views with a unit last stride."""
    common.check_dtype("gate_TI", gate_TI)
    if up_TI.shape != gate_TI.shape or up_TI.dtype != gate_TI.dtype or gate_TI.dim() != 2:
        raise ValueError(f"gate_TI {tuple(gate_TI.shape)} {gate_TI.dtype} and up_TI {tuple(up_TI.shape)} {up_TI.dtype} "
                         "must both be [T, I] of one dtype.")
    T, inter = gate_TI.shape
    gate_TI, up_TI = (x if x.stride(-1) == 1 else x.contiguous() for x in (gate_TI, up_TI))
    out = common.out_buffer(out, "out", (T, inter), gate_TI.dtype, gate_TI.device)
    if T == 0:
        return out
    BLOCK = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(T, triton.cdiv(inter, BLOCK))](
        gate_TI, up_TI, out, inter, gate_TI.stride(0), up_TI.stride(0), BLOCK=BLOCK,
        INTERPRET=common.interpreting(gate_TI), num_warps=4,
    )
    return out
