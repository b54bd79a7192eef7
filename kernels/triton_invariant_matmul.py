"""A batch-invariant dense matmul in Triton (issue 58 item 4): y = x @ w.T (+ bias) with one fixed launch config.

Legend: M rows (tokens), K in features, N out features.

A matmul library picks its kernel, its tiles and its split of the reduction by the problem's shape, so row r of
x_MK @ w_NK.T is summed in another order when M changes. Here one config holds for every M (per dtype, and one for
the interpreter): tiles of BLOCK_M x BLOCK_N, the K loop from 0 up in BLOCK_K steps with one fp32 accumulator, no
split-K, no persistent schedule. An output element is then the same sequence of MMAs over the same K chunks whatever
M is and wherever its row falls in its tile (a tensor-core MMA reduces each output element on its own), so a row's
result does not depend on the batch. The K tail is masked to zeros: adding exact zeros changes nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .triton_common import cast, dot


class MatmulConfig(NamedTuple):
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int


# One config per dtype, whatever M: bf16 / fp16 on tensor cores; fp32 dots are FMA loops that hold their operands
# in registers (smaller tiles, as the fp32 attention tiles). The interpreter's is small so its tests stay cheap.
CONFIGS = {torch.bfloat16: MatmulConfig(64, 128, 64, 4, 3), torch.float16: MatmulConfig(64, 128, 64, 4, 3),
           torch.float32: MatmulConfig(32, 64, 32, 4, 2)}
INTERPRETER_CONFIG = MatmulConfig(16, 32, 32, 4, 1)


def invariant_config(x: torch.Tensor) -> MatmulConfig:
    """The one config for x's dtype on x's device (never a function of M)."""
    return INTERPRETER_CONFIG if common.interpreting(x) else CONFIGS[x.dtype]


@triton.jit
def _bi_matmul_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      INTERPRET: tl.constexpr, PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    x_ptrs = x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk
    w_ptrs = w_ptr + rn.to(tl.int64)[None, :] * stride_wn + rk[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # in order from 0: the one reduction order of every row
        k_ok = (k0 + rk) < K
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = dot(a, b, acc, INTERPRET, PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], cast(acc, y_ptr.dtype.element_ty, INTERPRET),
             mask=m_ok[:, None] & n_ok[None, :])


def triton_invariant_linear(x_MK: torch.Tensor, w_NK: torch.Tensor, bias_N: torch.Tensor | None = None,
                            config: MatmulConfig | None = None) -> torch.Tensor:
    """F.linear(x, w, bias) for 2-D x [M, K] and w [N, K] of one float dtype (any strides): [M, N] in x's dtype,
    accumulated in fp32, on the fixed config (`config` overrides it: tests show another K tile rounds otherwise)."""
    common.check_dtype("x_MK", x_MK)
    if x_MK.dim() != 2 or w_NK.dim() != 2 or x_MK.shape[1] != w_NK.shape[1] or w_NK.dtype != x_MK.dtype:
        raise ValueError(f"x_MK {tuple(x_MK.shape)} {x_MK.dtype} and w_NK {tuple(w_NK.shape)} {w_NK.dtype} do not fit: "
                         "need [M, K] and [N, K] of one dtype.")
    M, K = x_MK.shape
    N = w_NK.shape[0]
    if bias_N is not None and tuple(bias_N.shape) != (N,):
        raise ValueError(f"bias_N {tuple(bias_N.shape)} is invalid: must be [{N}].")
    y = common.workspace((M, N), x_MK.dtype, x_MK.device)
    if M == 0 or N == 0:
        return y
    if K == 0:
        return y.zero_() if bias_N is None else y.copy_(bias_N.expand(M, N))
    cfg = config or invariant_config(x_MK)
    _bi_matmul_kernel[(triton.cdiv(M, cfg.BLOCK_M), triton.cdiv(N, cfg.BLOCK_N))](
        x_MK, w_NK, bias_N if bias_N is not None else y, y, M, N, K, x_MK.stride(0), x_MK.stride(1), w_NK.stride(0),
        w_NK.stride(1), y.stride(0), HAS_BIAS=bias_N is not None, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N,
        BLOCK_K=cfg.BLOCK_K, INTERPRET=common.interpreting(x_MK), PREC=common.dot_precision(x_MK.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


__all__ = ["CONFIGS", "INTERPRETER_CONFIG", "MatmulConfig", "invariant_config", "triton_invariant_linear"]
