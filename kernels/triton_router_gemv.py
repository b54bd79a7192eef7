"""A decode batch's router in one launch (kernels/router_topk.py's reference_gate_route_topk is the contract: the gate
matmul, then route_topk): the gate GEMV's logits and the top-k that read them were a GEMM and a route_topk launch,
the second waiting on the first.

Legend: T tokens, D hidden, G experts (gate rows), K top-k, BN rows a program.

How, grid (T, G / BN), program (t, n): rows [n BN, (n + 1) BN) of logits = x gateᵀ (+ gate bias) for token t
(kernels/triton_gemv.py's CUDA-core tiles; x converted to the gate's dtype as it is loaded: the DeepSeek family's
float32 gate reads bf16 x as float32, the cast launch folded in), rounded into logits_TG as the matmul would have
written them (the gate's dtype); then the token's last-arriving program (a per-token counter, reset by it: zeros
between launches, so a CUDA graph replays them) runs route_topk's row (`triton_router_topk.route_row`: scores,
group ranking, top-k, renormalisation and scale, the padding mask, the expert-load count) on the row, read past L1.

Numerics: route_topk's on the same logits; the logits sum each row's products in the program's fixed order, an ulp
of the gate's dtype from cuBLAS's at most (an id changes only where two experts' logits tie within it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .norm import FUSED_MAX_TOKENS
from .triton_gemv import check_weight, checked_counters, gemv_block_arrive, launch_shape
from .triton_router_topk import check_route_tensors, route_constexprs, route_row


@triton.jit
def _gate_topk_kernel(x_ptr, gate_ptr, gb_ptr, logits_ptr, cnt_ptr, bias_ptr, valid_ptr, counts_ptr, w_ptr, ids_ptr,
                      hidden, num_experts, stride_xt, stride_gn, group_size, num_groups, top_k, topk_group, scale,
                      HAS_GATE_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      K_TILES: tl.constexpr, ONE_STEP: tl.constexpr, METHOD: tl.constexpr, RENORM: tl.constexpr, RENORM_EPS: tl.constexpr,
                      GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr,
                      HAS_COUNTS: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                      INTERPRET: tl.constexpr):
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    arrived = gemv_block_arrive(x_ptr + t.to(tl.int64) * stride_xt, gate_ptr, gb_ptr,
                                logits_ptr + t.to(tl.int64) * num_experts, cnt_ptr + t, pid_n, num_experts, hidden,
                                stride_gn, x_ptr, x_ptr, 0, 1, HAS_GATE_BIAS, BLOCK_N, BLOCK_K, K_TILES, ONE_STEP,
                                False, 1, INTERPRET)  # a float gate: no FP8 scales
    if arrived == tl.num_programs(1) - 1:  # the token's last program: its whole logits row is stored
        tl.atomic_xchg(cnt_ptr + t, 0)
        route_row(logits_ptr, bias_ptr, valid_ptr, counts_ptr, w_ptr, ids_ptr, t, num_experts, group_size,
                  num_groups, top_k, topk_group, scale, METHOD, RENORM, RENORM_EPS, GROUPED, HAS_BIAS, HAS_VALID,
                  HAS_COUNTS, BP, BS, BK, INTERPRET, True)


def triton_gate_route_topk(
    x_TD: torch.Tensor, gate_GD: torch.Tensor, gate_bias_G: torch.Tensor | None, top_k: int, method: str = "greedy",
    renormalize: bool = False, scale: float = 1.0, n_group: int = 1, topk_group: int = 1,
    bias_G: torch.Tensor | None = None, valid_T: torch.Tensor | None = None, counts_G: torch.Tensor | None = None,
    counters_T: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `reference_gate_route_topk`: one launch for up to FUSED_MAX_TOKENS tokens, else the matmul
    and route_topk apart. counters_T: the layer's per-token counters (FUSED_MAX_TOKENS int32 zeros; made here when
    not given)."""
    common.check_dtype("x_TD", x_TD)
    common.check_dtype("gate_GD", gate_GD)
    if x_TD.dim() != 2:
        raise ValueError(f"x_TD has {x_TD.dim()} dims: must be [T, D].")
    T, D = x_TD.shape
    G = gate_GD.shape[0]
    check_weight("gate_GD", gate_GD, (G, D), gate_GD.dtype)
    if gate_bias_G is not None:
        check_weight("gate_bias_G", gate_bias_G, (G,), gate_GD.dtype)
    if T > FUSED_MAX_TOKENS:
        from .triton_router_topk import triton_route_topk

        logits_TG = torch.nn.functional.linear(x_TD.to(gate_GD.dtype), gate_GD, gate_bias_G)
        return (*triton_route_topk(logits_TG, top_k, method, renormalize, scale, n_group, topk_group, bias_G, valid_T,
                                   counts_G), logits_TG)
    interp = common.interpreting(x_TD)
    S, P, kept, consts = route_constexprs(G, top_k, method, renormalize, n_group, topk_group, bias_G, valid_T,
                                          counts_G, interp)
    check_route_tensors(T, G, bias_G, valid_T, counts_G)
    logits_TG = common.workspace((T, G), gate_GD.dtype, x_TD.device)
    weights_TK = common.workspace((T, top_k), torch.float32, x_TD.device)
    ids_TK = common.workspace((T, top_k), torch.int64, x_TD.device)
    if T == 0:
        return weights_TK, ids_TK, logits_TG
    counters_T = checked_counters(counters_T, x_TD.device)
    if gate_GD.stride(-1) != 1:
        raise ValueError("gate_GD must have a unit last stride (the gate's weight).")
    x_TD = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    # (rows down to one a program: DeepSeek-V3's 7.3 MB float32 gate over 256 programs, not 32)
    bn, bk, tiles, one_step, warps = launch_shape(G, D, 8, interp, x_TD.device, narrowest=1,
                                        itemsize=gate_GD.element_size())
    _gate_topk_kernel[(T, triton.cdiv(G, bn))](
        x_TD, gate_GD, gate_bias_G if gate_bias_G is not None else gate_GD, logits_TG, counters_T,
        bias_G if bias_G is not None else logits_TG, valid_T if valid_T is not None else logits_TG,
        counts_G if counts_G is not None else ids_TK, weights_TK, ids_TK, D, G, x_TD.stride(0), gate_GD.stride(0),
        S, P, top_k, kept, float(scale), HAS_GATE_BIAS=gate_bias_G is not None, BLOCK_N=bn, BLOCK_K=bk,
        K_TILES=tiles, ONE_STEP=one_step, **consts, num_warps=warps,
    )
    return weights_TK, ids_TK, logits_TG
