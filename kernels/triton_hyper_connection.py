"""DeepSeek-V4's hyper-connection residual step in Triton: the block's output spread over the `hc_mult` streams and
the streams mixed, one pass (kernels/hyper_connection.reference_hc_expand's contract):

    y[t, k, :] = post[t, k] * out[t, :] + sum_j comb[t, j, k] * x[t, j, :]

Grid (tokens, D tiles): each program reads its tile of the n input streams and the block output once and writes the
n output streams (the reference makes a broadcast product, a batched matmul and an add, each a pass over [T, n, D]).
The mixes come in float32 and are applied in float32 (the reference casts them to the activations' dtype first:
equal in float32, within bf16 rounding in bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .triton_common import cast


@triton.jit
def _hc_expand_kernel(x_ptr, out_ptr, post_ptr, comb_ptr, y_ptr, D, stride_xt, stride_xn, stride_ot, stride_pt,
                      stride_ct, stride_yt, stride_yn, N: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr, INTERPRET: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    k = tl.arange(0, BLOCK_N)
    dm, km = d < D, k < N
    o = tl.load(out_ptr + t * stride_ot + d, mask=dm, other=0.0).to(tl.float32)
    post = tl.load(post_ptr + t * stride_pt + k, mask=km, other=0.0).to(tl.float32)
    acc = post[:, None] * o[None, :]
    for j in tl.static_range(N):
        xj = tl.load(x_ptr + t * stride_xt + j * stride_xn + d, mask=dm, other=0.0).to(tl.float32)
        cj = tl.load(comb_ptr + t * stride_ct + j * N + k, mask=km, other=0.0).to(tl.float32)  # comb[t, j, :]
        acc += cj[:, None] * xj[None, :]
    tl.store(y_ptr + t * stride_yt + k[:, None] * stride_yn + d[None, :], cast(acc, y_ptr.dtype.element_ty, INTERPRET),
             mask=km[:, None] & dm[None, :])


def triton_hc_expand(x_TnD: torch.Tensor, out_TD: torch.Tensor, post_Tn: torch.Tensor,
                     comb_Tnn: torch.Tensor) -> torch.Tensor:
    """Same contract as hyper_connection.reference_hc_expand: [T, n, D] in x's dtype."""
    common.check_dtype("x_TnD", x_TnD)
    T, n, D = x_TnD.shape
    if out_TD.shape != (T, D) or post_Tn.shape != (T, n) or comb_Tnn.shape != (T, n, n):
        raise ValueError(f"out_TD {tuple(out_TD.shape)}, post_Tn {tuple(post_Tn.shape)} and comb_Tnn "
                         f"{tuple(comb_Tnn.shape)} are invalid: must be [{T}, {D}], [{T}, {n}] and [{T}, {n}, {n}].")
    y = common.workspace((T, n, D), x_TnD.dtype, x_TnD.device)
    if T == 0:
        return y
    x, out = x_TnD.contiguous(), out_TD.contiguous()
    post, comb = post_Tn.contiguous(), comb_Tnn.contiguous()
    interp = common.interpreting(x)
    block_d = min(1024, max(16, triton.next_power_of_2(D)))
    _hc_expand_kernel[(T, triton.cdiv(D, block_d))](
        x, out, post, comb, y, D, x.stride(0), x.stride(1), out.stride(0), post.stride(0), comb.stride(0), y.stride(0),
        y.stride(1), N=n, BLOCK_N=max(2, triton.next_power_of_2(n)), BLOCK_D=block_d, INTERPRET=interp, num_warps=4)
    return y


__all__ = ["triton_hc_expand"]
