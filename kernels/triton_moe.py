"""Fused MoE experts in Triton: align → gate-up GEMM with the gated activation → down GEMM × routed weight → top-k sum,
written once for every weight format (the pipeline), and its entry point for float weights.

Legend: T tokens, D hidden, E local experts, G global experts, I expert
intermediate size, F = 2I, K top-k, P = T*K pairs, R padded rows (moe_align).

Data flow (same math as `reference_fused_moe`):
1. `moe_align_block_size`: pair indices sorted by expert, each expert's run
   padded to BLOCK_M; one expert id per M block (-1: nothing to do).
2. Gate-up GEMM over blocks of sorted rows. A rows are gathered from x by
   `pair // K` (no permuted copy of the activations); each program keeps two
   accumulators, gate columns [n, n+BN) and up columns [I+n, I+n+BN), so
   SiLU(gate)·up happens in the epilogue and the [P, 2I] tensor never exists.
   The result h_RI is written in *sorted* row order, so the down GEMM reads
   contiguous rows.
3. Down GEMM: h_RI × w2[e]ᵀ, times the routed weight in the epilogue.
4. Top-k sum, by `combine`:
   - "sum" (default): the down GEMM writes one row per pair (y_PD, plain
     stores), then one pass adds each token's K rows in fp32. Deterministic:
     bit-identical outputs run to run, which the engine's reproducibility
     (seeded sampling, greedy parity) relies on. Costs one read of P·D.
   - "atomic": the down GEMM adds straight into an fp32 [T, D] buffer with
     atomics: no y_PD round trip, and for fp32 activations no pass at all
     after the GEMM (bf16/fp16 pay one cast). Summation order varies between
     runs (last-bit differences). benchmarks/moe_kernels.py measures both.
All accumulation is fp32 whatever the input dtype (fp32, bf16, fp16).

Weight formats plug into this pipeline (`sorted_fused_moe`) as a strategy object (triton_moe_gemm.WeightFormat):
its two GEMM kernels, built on the one GEMM scaffold (kernels/triton_moe_gemm.py) with the format's K loops, and
what they are launched with. Float weights: kernels/triton_moe_float.py (this module's `triton_fused_moe`); FP8 block-scaled
W8A8: kernels/triton_moe_fp8.py; the packed formats' K loops and host side: kernels/triton_moe_packed.py, with
MXFP4 (kernels/triton_moe_mxfp4.py), NVFP4 (triton_moe_nvfp4.py) and INT4 (triton_moe_int4.py) plugging in their
weight tile and dot. Every entry point's prologue after its weight checks is `routed`.
Expert biases (gpt-oss: b13 [E, F] on the gate-up GEMM, b2 [E, D] on the down GEMM, scaled by the routed
weight like the rest of the expert's output) and the activation (`MoEActivation`: SiLU·up, or gpt-oss's
clamped swiglu_oai) are constexpr switches of the scaffold's epilogues: without biases the kernels load nothing
more, and the SiLU path compiles to the code it always did.
Tiny batches (decode) skip all of the above when the launch config says so (`TINY`, kernels/moe_config.py):
kernels/triton_moe_tiny.py runs the layer in two launches (gate-up GEMV per pair, down GEMV with the top-k sum
per token), chosen from T*K alone, so CUDA graphs stay valid. `path` forces either path (benchmarks, tests).
The pair count is not specialised on (`do_not_specialize`): decode batches of odd and even sizes share
one compiled kernel per config (T*K % 16 would otherwise split them), so a new batch size never compiles.
No device→host sync anywhere: grids come from shapes only.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from . import triton_common as common
from . import triton_moe_tiny
from .moe import SILU, MoEActivation
from .moe_align import _local_expert, moe_align_block_size
from .moe_config import DEFAULT_TINY_FLOAT, GemmConfig, MoELaunchConfig, get_moe_config
from .moe_schedule import gemm_grid
from .triton_common import cast
from .triton_moe_float import FloatFormat
from .triton_moe_gemm import ROW_BIAS, WeightFormat

ACT_SILU, ACT_SWIGLU_OAI, ACT_SILU_CLAMP, ACT_RELU2 = 0, 1, 2, 3  # the ACT constexpr of the gate-up epilogue
_ACT_CODES = {"silu": ACT_SILU, "swiglu_oai": ACT_SWIGLU_OAI, "silu_clamp": ACT_SILU_CLAMP, "relu2": ACT_RELU2}
_PATHS = ("auto", "tiny", "sorted")


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_sum_kernel(y_ptr, ids_ptr, map_ptr, out_ptr, num_pairs, num_ids, hidden, top_k, stride_yr, stride_ot,
                    BLOCK_D: tl.constexpr, HAS_MAP: tl.constexpr, INTERPRET: tl.constexpr):
    # Pairs that no local expert computed were never written: skip them, do not read them.
    t = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < hidden
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for k in range(0, top_k):
        pair = t * top_k + k
        local = _local_expert(ids_ptr, map_ptr, pair, num_pairs, num_ids, HAS_MAP)
        # (broadcast before `&`: the interpreter rejects a scalar-and-vector mask)
        ok = d_ok & ((tl.zeros([BLOCK_D], dtype=tl.int32) + local) >= 0)
        y = tl.load(y_ptr + pair.to(tl.int64) * stride_yr + offs_d, mask=ok, other=0.0)
        acc += y.to(tl.float32)
    tl.store(out_ptr + t.to(tl.int64) * stride_ot + offs_d, cast(acc, out_ptr.dtype.element_ty, INTERPRET), mask=d_ok)


def check_bias(name: str, b: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    """None, or the bias [rows, cols] (any float dtype) with contiguous rows; anything else is named."""
    if b is None:
        return None
    if not b.dtype.is_floating_point or tuple(b.shape) != (rows, cols):
        raise ValueError(f"{name} {tuple(b.shape)} {b.dtype} is invalid: must be a float tensor [{rows}, {cols}].")
    return b if b.stride(-1) == 1 else b.contiguous()


def activation_args(activation: MoEActivation) -> tuple[int, float, float]:
    """(ACT constexpr, alpha, limit) for `activation_epilogue`."""
    if not isinstance(activation, MoEActivation):
        raise ValueError(f"activation={activation!r} is invalid: must be a moelink.kernels.moe.MoEActivation.")
    return _ACT_CODES[activation.kind], float(activation.alpha), float(activation.limit)


def check_routing(x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor) -> None:
    """Routing of every format's entry point: ids and weights both [T, K]."""
    if topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"topk_ids_TK {tuple(topk_ids_TK.shape)} and topk_weights_TK {tuple(topk_weights_TK.shape)} "
                         f"must both be [T, K] with T={x_TD.shape[0]}.")


def output(x_TD: torch.Tensor, out: torch.Tensor | None, combine: str) -> torch.Tensor:
    """The [T, D] result buffer in x's dtype: `out` checked, else a new one; `combine` checked too."""
    if combine not in ("sum", "atomic"):
        raise ValueError(f"combine={combine!r} is invalid: must be 'sum' or 'atomic'.")
    dt = x_TD.dtype
    if out is None:
        return common.workspace(tuple(x_TD.shape), dt, x_TD.device)
    if out.shape != x_TD.shape or out.dtype != dt or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} is invalid: must be [T, D] = {tuple(x_TD.shape)}, {dt}, rows contiguous.")
    return out


class Routed(NamedTuple):
    """What every format's entry point holds once its weights are checked (`routed`)."""

    x_TD: torch.Tensor  # rows contiguous
    weights_P: torch.Tensor  # the flat [T*K] routing
    ids_P: torch.Tensor
    b13_EF: torch.Tensor | None  # checked
    b2_ED: torch.Tensor | None
    act_args: tuple[int, float, float]  # `activation_args`
    out: torch.Tensor  # `output`
    T: int
    K: int

    def sorted(self, fmt: WeightFormat, expert_map_G: torch.Tensor | None, cfg: MoELaunchConfig,
               combine: str, lora: Any = None) -> torch.Tensor:
        """`sorted_fused_moe` of these inputs with weights in format `fmt`."""
        return sorted_fused_moe(fmt, self.x_TD, self.weights_P, self.ids_P, expert_map_G, self.K, cfg, self.out, combine,
                                self.b13_EF, self.b2_ED, self.act_args, lora)


def routed(x_TD: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor, num_experts: int, inter: int,
           b13_EF: torch.Tensor | None, b2_ED: torch.Tensor | None, activation: MoEActivation,
           out: torch.Tensor | None, combine: str) -> Routed:
    """The entry points' prologue after their weight checks, written once: the biases checked (b13 [E, 2I], b2
    [E, D]), `activation_args`, the result buffer (`output`), x with contiguous rows and the flat routing."""
    D = x_TD.shape[1]
    b13_EF, b2_ED = check_bias("b13_EF", b13_EF, num_experts, 2 * inter), check_bias("b2_ED", b2_ED, num_experts, D)
    act_args = activation_args(activation)
    out = output(x_TD, out, combine)
    x_TD = x_TD if x_TD.stride(-1) == 1 else x_TD.contiguous()
    return Routed(x_TD, topk_weights_TK.reshape(-1).contiguous(), topk_ids_TK.reshape(-1).contiguous(), b13_EF, b2_ED,
                  act_args, out, x_TD.shape[0], topk_ids_TK.shape[1])


def _gemm_constexprs(bm: int, g: GemmConfig, k_dim: int) -> dict:
    """The scaffold's launch keywords every format's kernels take for one GEMM of reduction dim `k_dim`."""
    return dict(BLOCK_M=bm, BLOCK_N=g.BLOCK_SIZE_N, BLOCK_K=g.BLOCK_SIZE_K, GROUP_M=g.GROUP_SIZE_M,
                EVEN_K=k_dim % g.BLOCK_SIZE_K == 0, PERSISTENT=g.PERSISTENT > 0, num_warps=g.num_warps,
                num_stages=g.num_stages)


def sorted_fused_moe(fmt: WeightFormat, x_TD: torch.Tensor, weights_P: torch.Tensor, ids_P: torch.Tensor,
                     expert_map_G: torch.Tensor | None, top_k: int, cfg: MoELaunchConfig, out: torch.Tensor,
                     combine: str, b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                     act_args: tuple[int, float, float] = (ACT_SILU, SILU.alpha, SILU.limit),
                     lora: Any = None) -> torch.Tensor:
    """The sorted path for weights in format `fmt`: x_TD [T, D] (T >= 1, rows contiguous), the flat routing
    weights_P / ids_P [T*K], checked biases and `activation_args`; writes and returns out [T, D] (x's dtype).
    Module docstring. `lora` (kernels/triton_lora_moe.py `SortedLoRA`, with combine "sum"; b13 None when it has a gate_up delta, which
    then carries b13): per-expert
    LoRA deltas on the sorted rows, gate_up's added in the gate-up GEMM's epilogue (`ROW_BIAS`), down's to each
    pair's row before the top-k sum."""
    T, D = x_TD.shape
    E, I = fmt.num_experts, fmt.inter
    dev, dt = x_TD.device, x_TD.dtype
    act, alpha, limit = act_args
    up, down = fmt.gemms(cfg)
    BM = cfg.BLOCK_SIZE_M
    a = fmt.activations(x_TD)
    sorted_R, expert_ids_B, rows_1 = moe_align_block_size(ids_P, BM, E, expert_map_G)
    R, P = sorted_R.numel(), ids_P.numel()
    interp = common.interpreting(x_TD)
    flags = dict(INTERPRET=interp, PREC=common.dot_precision(dt))
    align = dict(sorted_ptr=sorted_R, expert_ids_ptr=expert_ids_B, num_rows_ptr=rows_1, num_pairs=P, num_rows=R,
                 num_experts=E, top_k=top_k)

    h = fmt.hidden(R, x_TD)
    d_RF = None if lora is None else lora.gate_up_rows(x_TD, sorted_R, expert_ids_B, I)
    if d_RF is not None and b13_EF is not None:
        raise ValueError("b13_EF with a gate_up LoRA delta: pass it to the delta (SortedLoRA.b13_EF), not here.")
    bias, has_bias = (b13_EF, b13_EF is not None) if d_RF is None else (d_RF, ROW_BIAS)
    kernel, operands = fmt.up_launch(up, a, h)
    kernel[(gemm_grid(R // BM * triton.cdiv(I, up.BLOCK_SIZE_N), up.PERSISTENT, dev),)](
        **align, inter=I, hidden=D, b13_ptr=x_TD if bias is None else bias,
        stride_be=0 if bias is None else bias.stride(0), alpha=alpha, limit=limit,
        **{**_gemm_constexprs(BM, up, D), "HAS_BIAS": has_bias, "ACT": act, **flags, **operands})

    atomic = combine == "atomic"
    if lora is not None and atomic:
        raise ValueError("combine='atomic' is invalid with LoRA deltas: they are added to each pair's row.")
    if atomic:
        y = out if (dt == torch.float32 and out.is_contiguous()) else common.workspace((T, D), torch.float32, dev)
        y.zero_()
    else:
        y = common.workspace((P, D), dt, dev)
    kernel, operands = fmt.down_launch(down, h)
    kernel[(gemm_grid(R // BM * triton.cdiv(D, down.BLOCK_SIZE_N), down.PERSISTENT, dev),)](
        **align, hidden=D, inter=I, b2_ptr=weights_P if b2_ED is None else b2_ED,
        stride_be=0 if b2_ED is None else b2_ED.stride(0), weights_ptr=weights_P, y_ptr=y, stride_yr=y.stride(0),
        **{**_gemm_constexprs(BM, down, I), "ATOMIC": atomic, "HAS_BIAS": b2_ED is not None, **flags, **operands})
    if lora is not None:
        lora.add_down(h[0], y, weights_P, sorted_R, expert_ids_B)
    if atomic:
        if y is not out:
            out.copy_(y)
        return out
    has_map = expert_map_G is not None
    BLOCK_D = min(1024, triton.next_power_of_2(D))
    _moe_sum_kernel[(T, triton.cdiv(D, BLOCK_D))](
        y, ids_P, expert_map_G if has_map else ids_P, out, P, expert_map_G.numel() if has_map else E, D, top_k,
        y.stride(0), out.stride(0),
        BLOCK_D=BLOCK_D, HAS_MAP=has_map, INTERPRET=interp, num_warps=4,
    )
    return out


def _check(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK) -> None:
    common.check_dtype("x_TD", x_TD)
    if w13_EFD.dtype != x_TD.dtype or w2_EDI.dtype != x_TD.dtype:
        raise ValueError(f"expert weights are {w13_EFD.dtype}/{w2_EDI.dtype}: they must match x_TD.dtype={x_TD.dtype}.")
    E, F, D = w13_EFD.shape
    if F % 2 or x_TD.shape[1] != D or tuple(w2_EDI.shape) != (E, D, F // 2):
        raise ValueError(f"shapes x_TD={tuple(x_TD.shape)}, w13_EFD={tuple(w13_EFD.shape)}, w2_EDI={tuple(w2_EDI.shape)} "
                         "do not fit: need w13 [E, 2I, D] and w2 [E, D, I].")
    check_routing(x_TD, topk_weights_TK, topk_ids_TK)


def triton_fused_moe(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor, topk_weights_TK: torch.Tensor,
                     topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None, *,
                     b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                     activation: MoEActivation = SILU, out: torch.Tensor | None = None,
                     config: MoELaunchConfig | None = None, combine: str = "sum", path: str = "auto") -> torch.Tensor:
    """Same contract as `reference_fused_moe` (biases b13 [E, F] / b2 [E, D] of any float dtype, activation):
    [T, D] in x's dtype; rows whose experts are all remote are 0.

    `out` (optional [T, D], x's dtype) receives the result; `config` overrides
    the JSON launch config; `combine` is "sum" or "atomic" (module docstring); `path` is "auto" (the
    config's TINY.max_pairs decides), "tiny" (always the two-launch tiny path; the config's TINY blocks, else
    DEFAULT_TINY_FLOAT's; it sums deterministically whatever `combine` says) or "sorted" (never the tiny path).
    No device→host sync: grids come from shapes only.
    """
    _check(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK)
    if path not in _PATHS:
        raise ValueError(f"path={path!r} is invalid: must be one of {', '.join(_PATHS)}.")
    E, F, _ = w13_EFD.shape
    I = F // 2
    r = routed(x_TD, topk_weights_TK, topk_ids_TK, E, I, b13_EF, b2_ED, activation, out, combine)
    if r.T == 0:
        return r.out
    w13_EFD, w2_EDI = (t if t.stride(-1) == 1 else t.contiguous() for t in (w13_EFD, w2_EDI))
    cfg = config or get_moe_config(E, I, r.T, r.K, r.x_TD.device)
    if path == "tiny" or (path == "auto" and cfg.uses_tiny(r.T * r.K)):
        return triton_moe_tiny.tiny_fused_moe(r.x_TD, w13_EFD, w2_EDI, r.weights_P, r.ids_P, expert_map_G, r.b13_EF,
                                              r.b2_ED, *r.act_args, r.out, cfg.tiny or DEFAULT_TINY_FLOAT, r.K)
    return r.sorted(FloatFormat(E, I, w13_EFD, w2_EDI), expert_map_G, cfg, combine)
