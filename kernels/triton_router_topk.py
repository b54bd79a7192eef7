"""Router top-k in one launch (kernels/router_topk.py is the contract): scores, group ranking, top-k, the
renormalisation and scale, the padding-row mask and the expert-load count. One program per token.

Legend: T tokens, G experts, K top-k, P groups, S experts per group; BP, BS, BK their power-of-two blocks.

A token's G logits are held as a [BP, BS] tile (row p = group p; ungrouped methods have P = 1), so group
scores are row reductions and G need not be a power of two (DeepSeek-V2's 160 = 8 x 20). Top-k is K rounds
of "largest value, lowest index among equals, then remove it".

Numerics against the reference: the scores use libdevice's expf (what torch's CUDA softmax and sigmoid call,
not the approximate ex2 of tl.exp), divisions correctly rounded (div_rn); softmax divides by the sum as torch's
CUDA softmax does (torch's CPU softmax multiplies by its reciprocal: an ulp apart at times). The fp32 sums (the
softmax denominator, the top-k renormalisation) associate in the tile's order, not torch's: the weights may
differ from the reference by an ulp or two of fp32; ids differ only where two scores tie to within those ulps.
The id order: "greedy" is torch.topk's sorted order (largest first), as here; the grouped methods use
topk(sorted=False), whose order torch leaves unspecified, while this kernel returns them largest first (the same
set; the MoE's top-k sum then adds in another order: last-bit differences in the layer output).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from . import triton_common as common
from .router_topk import METHODS, check_method

_METHOD_CODES = {m: i for i, m in enumerate(METHODS)}  # 0 greedy, 1 group_limited_greedy, 2 noaux_tc, 3 sqrtsoftplus


@triton.jit
def _exp(x, INTERPRET: tl.constexpr):
    """e^x: libdevice's expf on a GPU (the interpreter has no libdevice; numpy's exp there)."""
    if INTERPRET:
        return tl.exp(x)
    return libdevice.exp(x)


@triton.jit
def _softplus(x, INTERPRET: tl.constexpr):
    """torch's softplus (beta 1, threshold 20): x past 20, else log1p(e^x) (libdevice's log1p and expf on a GPU;
    the interpreter has no libdevice: Kahan's log1p, log(u) z / (u - 1) with u = 1 + z, keeps its relative error
    at fp32's for small z, where log(1 + z) would lose it)."""
    if INTERPRET:
        z = tl.exp(x)
        u = 1.0 + z
        y = tl.where(u == 1.0, z, tl.log(u) * z / (u - 1.0))
    else:
        y = libdevice.log1p(libdevice.exp(x))
    return tl.where(x > 20.0, x, y)


@triton.jit
def _argmax_2d(x, idx, BIG: tl.constexpr):
    """(largest value of a 2-D tile, lowest flat index holding it)."""
    v = tl.max(tl.max(x, axis=1), axis=0)
    i = tl.min(tl.min(tl.where(x == v, idx, BIG), axis=1), axis=0)
    return v, i


@triton.jit
def route_row(logits_ptr, bias_ptr, valid_ptr, counts_ptr, w_ptr, ids_ptr, t, stride_lt,
              group_size, num_groups, top_k, topk_group, scale,
              METHOD: tl.constexpr, RENORM: tl.constexpr, RENORM_EPS: tl.constexpr,
              GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr,
              HAS_COUNTS: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
              INTERPRET: tl.constexpr, VOLATILE: tl.constexpr):
    """Token t's top-k from its logits row: one program of `_router_topk_kernel`, and the tail of
    kernels/triton_router_gemv.py's last-arriving program (VOLATILE: the row was written by other programs of
    that launch, so it is read past L1)."""
    p = tl.arange(0, BP)[:, None]
    s = tl.arange(0, BS)[None, :]
    ok = (p < num_groups) & (s < group_size)
    g = p * group_size + s  # [BP, BS] expert ids
    neg = float("-inf")
    x = tl.load(logits_ptr + t.to(tl.int64) * stride_lt + g, mask=ok, other=neg, volatile=VOLATILE).to(tl.float32)
    if METHOD == 2:  # sigmoid: 1 / (1 + e^-x), as torch's kernel
        scores = tl.div_rn(tl.full(x.shape, 1.0, tl.float32), 1.0 + _exp(-x, INTERPRET))
    elif METHOD == 3:  # sqrt(softplus(x)) (padding lanes: -inf -> 0, masked out of the choice below)
        scores = tl.sqrt_rn(_softplus(tl.where(ok, x, 0.0), INTERPRET))
    else:  # softmax over all G: e^(x - max) / sum
        m = tl.max(tl.max(x, axis=1), axis=0)
        e = tl.where(ok, _exp(x - m, INTERPRET), 0.0)
        total = tl.sum(tl.sum(e, axis=1), axis=0)
        scores = tl.div_rn(e, tl.zeros_like(e) + total)
    choice = scores
    if HAS_BIAS:
        choice = scores + tl.load(bias_ptr + g, mask=ok, other=0.0).to(tl.float32)
    choice = tl.where(ok, choice, neg)
    if GROUPED:
        # Group score: the best expert's (softmax), or the sum of the best two (noaux_tc).
        best = tl.max(choice, axis=1)  # [BP]
        if METHOD == 2:
            s_idx = tl.zeros([BP, BS], dtype=tl.int32) + s
            first = tl.min(tl.where(choice == best[:, None], s_idx, BS), axis=1)
            second = tl.max(tl.where(s_idx == first[:, None], neg, choice), axis=1)
            best = best + second
        pid = tl.arange(0, BP)
        best = tl.where(pid < num_groups, best, neg)
        keep = tl.zeros([BP], dtype=tl.int1)
        for _ in range(0, topk_group):
            v = tl.max(best, axis=0)
            i = tl.min(tl.where(best == v, pid, BP), axis=0)
            keep = keep | (pid == i)
            best = tl.where(pid == i, neg, best)
        if METHOD == 2:  # outside the chosen groups: never selected
            choice = tl.where(keep[:, None], choice, neg)
        else:  # the reference zeroes their scores (still selectable after the kept ones, as in torch)
            choice = tl.where(keep[:, None] & ok, choice, tl.where(ok, 0.0, neg))
    kk = tl.arange(0, BK)
    w_K = tl.zeros([BK], dtype=tl.float32)
    id_K = tl.zeros([BK], dtype=tl.int32)
    for k in range(0, top_k):
        v, i = _argmax_2d(choice, g, BP * BS)
        if METHOD >= 2:  # the weight is the unbiased score
            v = tl.sum(tl.sum(tl.where(g == i, scores, 0.0), axis=1), axis=0)
        w_K = tl.where(kk == k, v, w_K)
        id_K = tl.where(kk == k, i, id_K)
        choice = tl.where(g == i, neg, choice)
    k_ok = kk < top_k
    if RENORM:
        denom = tl.sum(tl.where(k_ok, w_K, 0.0), axis=0) + RENORM_EPS
        w_K = tl.div_rn(w_K, tl.zeros_like(w_K) + denom)
    w_K = w_K * scale
    ids64 = id_K.to(tl.int64)
    if HAS_VALID:
        valid = tl.load(valid_ptr + t).to(tl.int32)
        ids64 = tl.where((tl.zeros([BK], dtype=tl.int32) + valid) != 0, ids64, -1)
    tl.store(w_ptr + t.to(tl.int64) * top_k + kk, w_K, mask=k_ok)
    tl.store(ids_ptr + t.to(tl.int64) * top_k + kk, ids64, mask=k_ok)
    if HAS_COUNTS:
        tl.atomic_add(counts_ptr + tl.maximum(ids64, 0), tl.full([BK], 1, tl.int64), mask=k_ok & (ids64 >= 0))


@triton.jit
def _router_topk_kernel(logits_ptr, bias_ptr, valid_ptr, counts_ptr, w_ptr, ids_ptr, stride_lt,
                        group_size, num_groups, top_k, topk_group, scale,
                        METHOD: tl.constexpr, RENORM: tl.constexpr, RENORM_EPS: tl.constexpr,
                        GROUPED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_VALID: tl.constexpr,
                        HAS_COUNTS: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr, BK: tl.constexpr,
                        INTERPRET: tl.constexpr):
    route_row(logits_ptr, bias_ptr, valid_ptr, counts_ptr, w_ptr, ids_ptr, tl.program_id(0), stride_lt, group_size,
              num_groups, top_k, topk_group, scale, METHOD, RENORM, RENORM_EPS, GROUPED, HAS_BIAS, HAS_VALID,
              HAS_COUNTS, BP, BS, BK, INTERPRET, False)


def route_constexprs(G: int, top_k: int, method: str, renormalize: bool, n_group: int, topk_group: int,
                     bias_G, valid_T, counts_G, interp: bool) -> tuple[int, int, int, dict]:
    """(S experts a group, P groups, the group count the kernel ranks to, the constexprs) of a route_topk launch;
    checks the routing arguments (one clear error naming them)."""
    check_method(method, bias_G)
    grouped = method in ("group_limited_greedy", "noaux_tc")
    P = n_group if grouped else 1
    if not 1 <= top_k <= G or G % P or not 1 <= topk_group <= P:
        raise ValueError(f"top_k={top_k}, n_group={n_group}, topk_group={topk_group} are invalid for {G} experts: "
                         "need 1 <= top_k <= experts, n_group dividing them and 1 <= topk_group <= n_group.")
    S = G // P
    BP, BS = triton.next_power_of_2(P), triton.next_power_of_2(S)
    return S, P, topk_group if grouped else 1, dict(
        METHOD=_METHOD_CODES[method], RENORM=bool(renormalize), RENORM_EPS=0.0 if method == "greedy" else 1e-20,
        GROUPED=grouped and topk_group < P, HAS_BIAS=bias_G is not None, HAS_VALID=valid_T is not None,
        HAS_COUNTS=counts_G is not None, BP=BP, BS=BS, BK=triton.next_power_of_2(top_k), INTERPRET=interp)


def check_route_tensors(T: int, G: int, bias_G, valid_T, counts_G) -> None:
    for name, t, dt in (("bias_G", bias_G, None), ("valid_T", valid_T, torch.bool), ("counts_G", counts_G, torch.int64)):
        n = G if name != "valid_T" else T
        if t is not None and (tuple(t.shape) != (n,) or (dt is not None and t.dtype != dt) or not t.is_contiguous()):
            raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} is invalid: must be contiguous [{n}]"
                             + (f" {dt}." if dt is not None else "."))


def triton_route_topk(
    logits_TG: torch.Tensor, top_k: int, method: str = "greedy", renormalize: bool = False, scale: float = 1.0,
    n_group: int = 1, topk_group: int = 1, bias_G: torch.Tensor | None = None, valid_T: torch.Tensor | None = None,
    counts_G: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `reference_route_topk`, one launch (module docstring: where the results may differ)."""
    if logits_TG.dim() != 2 or not logits_TG.dtype.is_floating_point or logits_TG.dtype == torch.float64:
        raise ValueError(f"logits_TG {tuple(logits_TG.shape)} {logits_TG.dtype} is invalid: must be [T, G] float32, "
                         "bfloat16 or float16 (the reference takes float64).")
    T, G = logits_TG.shape
    S, P, kept, consts = route_constexprs(G, top_k, method, renormalize, n_group, topk_group, bias_G, valid_T,
                                          counts_G, common.interpreting(logits_TG))
    check_route_tensors(T, G, bias_G, valid_T, counts_G)
    logits_TG = logits_TG if logits_TG.stride(-1) == 1 else logits_TG.contiguous()
    weights_TK = common.workspace((T, top_k), torch.float32, logits_TG.device)
    ids_TK = common.workspace((T, top_k), torch.int64, logits_TG.device)
    if T == 0:
        return weights_TK, ids_TK
    _router_topk_kernel[(T,)](
        logits_TG, bias_G if bias_G is not None else logits_TG, valid_T if valid_T is not None else logits_TG,
        counts_G if counts_G is not None else ids_TK, weights_TK, ids_TK, logits_TG.stride(0),
        S, P, top_k, kept, float(scale), **consts, num_warps=1 if consts["BP"] * consts["BS"] <= 256 else 4,
    )
    return weights_TK, ids_TK
