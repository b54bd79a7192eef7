"""FP8 block-scaled W8A8 in Triton: per-token-group activation quantization and the dense GEMM.

Legend: T tokens, K input channels (reduction), N output channels, G = ceil(K / Bk) activation groups per
token, Bn x Bk the weight block (128 x 128 in every published checkpoint). Contract and layouts: kernels/fp8.py
(`per_token_group_quant`, `reference_fp8_linear`), which is also the oracle of the tests.

- `triton_per_token_group_quant`: x [T, K] → (xq float8_e4m3fn [T, K], scale float32 [T, G]), bit-identical to
  the reference: the same fp32 amax, the same IEEE fp32 division (`tl.div_rn`: Triton's `/` compiles to the
  approximate div.full.f32, up to 2 ulp off torch's), round to nearest even.
- `triton_fp8_linear`: quantize x, then one GEMM whose K loop takes BLOCK_K ≤ Bk channels at a time (Bk a
  multiple of BLOCK_K, so a K step never straddles two scale groups): an fp8 x fp8 dot into a fresh fp32 tile,
  times the token's activation scale and the column's weight scale, added to the fp32 accumulator. Promoting
  every K block to fp32 is DeepSeek-V3's recipe against the tensor cores' narrow FP8 accumulation.

The Triton CPU interpreter (TRITON_INTERPRET=1, the CPU tests) loads float8_e4m3fn and computes fp8 tl.dot
exactly (it widens to fp32), but its fp32 → fp8 cast is wrong: a mantissa that rounds up into the next binade
loses the carry (31.18 → 16 instead of 32), ties round away from zero, and subnormals are mishandled. So
`to_fp8` rounds in fp32 bit arithmetic there and bitcasts the code it built; compiled code uses the hardware
cast (cvt.rn.satfinite: nearest even).
"""
from __future__ import annotations

import functools
import json

import torch
import triton
import triton.language as tl

from . import moe_config
from . import triton_common as common
from .triton_common import to_fp8
from .fp8 import DEFAULT_BLOCK, FP8_DTYPE, _check_block, block_scale_shape
from .moe_config import MoELaunchConfig

FP8_MAX = 448.0
MIN_SCALE = 1e-12  # = fp8._MIN_SCALE: a zero group still gets a finite scale
LINEAR_CONFIG = moe_config.CONFIG_DIR / "fp8_linear.json"


@triton.jit
def quant_tile(v, GROUPS: tl.constexpr, GROUP: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 tile [M, GROUPS * GROUP] → (fp8 tile, scales [M, GROUPS]): one scale per row per GROUP columns,
    amax / 448 (at least MIN_SCALE), exactly as fp8.per_token_group_quant."""
    M: tl.constexpr = v.shape[0]
    v3 = tl.reshape(v, [M, GROUPS, GROUP])
    amax = tl.max(tl.abs(v3), axis=2)
    scale = tl.maximum(tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1e-12)
    q = tl.clamp(tl.div_rn(v3, tl.broadcast_to(scale[:, :, None], v3.shape)), -448.0, 448.0)
    return tl.reshape(to_fp8(q, INTERPRET), [M, GROUPS * GROUP]), scale


@triton.jit
def _group_quant_kernel(x_ptr, q_ptr, s_ptr, K, num_groups, num_rows, stride_xt, stride_qt, stride_st,
                        GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_R: tl.constexpr,
                        INTERPRET: tl.constexpr):
    # One program: BLOCK_R (token, group) rows of the flattened [T * G, GROUP] view, so short rows (decode,
    # small K) still fill a tile. GROUP_P2 = GROUP rounded up to a power of two, the lanes past GROUP masked.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    t, g = r // num_groups, r % num_groups
    offs_c = tl.arange(0, GROUP_P2)
    k = g[:, None] * GROUP + offs_c[None, :]
    ok = (r[:, None] < num_rows) & (offs_c[None, :] < GROUP) & (k < K)
    x = tl.load(x_ptr + t[:, None] * stride_xt + k, mask=ok, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.maximum(tl.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1e-12)
    q = tl.clamp(tl.div_rn(x, tl.broadcast_to(scale[:, None], x.shape)), -448.0, 448.0)
    tl.store(q_ptr + t[:, None] * stride_qt + k, to_fp8(q, INTERPRET), mask=ok)
    tl.store(s_ptr + t * stride_st + g, scale, mask=r < num_rows)


def quant_block_rows(rows: int, group: int, interpret: bool) -> int:
    """BLOCK_R of the group quantization of `rows` (token, group) rows (a compile-time size: start-up warm-up
    compiles each: kernels/moe_variants.py): ~4K elements a program on a GPU; the interpreter pays per
    program, so it takes up to 32K."""
    return max(1, min(triton.next_power_of_2(rows), (32768 if interpret else 4096) // triton.next_power_of_2(group)))


def triton_per_token_group_quant(x_TK: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as fp8.per_token_group_quant: (xq float8_e4m3fn [T, K], scale float32 [T, ceil(K/group)])."""
    if group <= 0:
        raise ValueError(f"group={group} is invalid: a positive channel count (the weight's Bk, 128).")
    if x_TK.dim() != 2:
        raise ValueError(f"x_TK has shape {tuple(x_TK.shape)}: expected [T, K].")
    common.check_dtype("x_TK", x_TK)
    T, K = x_TK.shape
    G = triton.cdiv(K, group)
    xq = common.workspace((T, K), FP8_DTYPE, x_TK.device)
    scale = common.workspace((T, G), torch.float32, x_TK.device)
    if T == 0 or K == 0:
        return xq, scale
    if x_TK.stride(-1) != 1:
        x_TK = x_TK.contiguous()
    interp = common.interpreting(x_TK)
    p2 = triton.next_power_of_2(group)
    block_r = quant_block_rows(T * G, group, interp)
    _group_quant_kernel[(triton.cdiv(T * G, block_r),)](
        x_TK, xq, scale, K, G, T * G, x_TK.stride(0), xq.stride(0), scale.stride(0),
        GROUP=group, GROUP_P2=p2, BLOCK_R=block_r, INTERPRET=interp, num_warps=4)
    return xq, scale


@triton.jit
def _fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K,
                     stride_am, stride_asm, stride_bn, stride_bsn, stride_cm,
                     SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                     HAS_BIAS: tl.constexpr, INTERPRET: tl.constexpr):
    # Grouped launch order: GROUP_M row blocks sweep the column blocks together, sharing weight tiles in L2.
    pid = tl.program_id(0)
    num_pid_m, num_pid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = offs_m < M, offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    as_ptrs = as_ptr + offs_m.to(tl.int64) * stride_asm
    bs_ptrs = bs_ptr + (offs_n // SCALE_N) * stride_bsn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a_s = tl.load(as_ptrs + k0 // SCALE_K, mask=m_ok, other=0.0)
        b_s = tl.load(bs_ptrs + k0 // SCALE_K, mask=n_ok, other=0.0)
        acc += tl.dot(a, b, out_dtype=tl.float32) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, common.cast(acc, c_ptr.dtype.element_ty, INTERPRET), mask=m_ok[:, None] & n_ok[None, :])


def check_triton_block(block: tuple[int, int]) -> tuple[int, int]:
    """The blocks the Triton FP8 kernels take: Bk a power of two >= 16 (a K step must fit in one scale group);
    Bn any positive size (scales are looked up per column)."""
    bn, bk = _check_block(block)
    if bk < 16 or bk & (bk - 1):
        raise ValueError(f"weight_block_size={[bn, bk]} is not supported by the Triton FP8 kernels: Bk must be a power "
                         "of two >= 16 (published checkpoints use 128); use the reference kernels.")
    return bn, bk


def check_fp8_weight(name: str, wq: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> None:
    if wq.dtype != FP8_DTYPE:
        raise ValueError(f"{name}.dtype={wq.dtype} is invalid: FP8 weights are torch.float8_e4m3fn.")
    want = tuple(wq.shape[:-2]) + block_scale_shape(wq.shape[-2], wq.shape[-1], block)
    if tuple(scale.shape) != want or scale.dtype != torch.float32:
        raise ValueError(f"{name}_scale_inv is {tuple(scale.shape)} {scale.dtype}: expected {want} torch.float32 for a "
                         f"{tuple(wq.shape)} weight in {block[0]}x{block[1]} blocks.")


def fp8_linear_config(num_tokens: int, device: torch.device) -> MoELaunchConfig:
    """The dense GEMM's launch config: fp8_linear.json (GPUs) or its "interpreter" bucket list (CPU), keyed by T
    (the largest bucket not above wins). Only BLOCK_SIZE_M and the gate-up fields are read."""
    section = "interpreter" if moe_config.device_name(device) == "cpu" else "gpu"
    buckets = _linear_buckets(section)
    best = buckets[0][1]
    for bucket, cfg in buckets:
        if bucket <= num_tokens:
            best = cfg
    return best


@functools.lru_cache(maxsize=2)
def _linear_buckets(section: str) -> tuple[tuple[int, MoELaunchConfig], ...]:
    """((T bucket, config), ...) of one section of fp8_linear.json, sorted, each checked by MoELaunchConfig.from_dict."""
    data = json.loads(LINEAR_CONFIG.read_text())[section]
    return tuple(sorted((int(b), MoELaunchConfig.from_dict(c, f"{LINEAR_CONFIG.name}[{section}][{b}]")) for b, c in data.items()))


def triton_fp8_linear(x_TK: torch.Tensor, wq_NK: torch.Tensor, w_scale_inv: torch.Tensor,
                      block: tuple[int, int] = DEFAULT_BLOCK, bias_N: torch.Tensor | None = None, *,
                      config: MoELaunchConfig | None = None) -> torch.Tensor:
    """Same contract as fp8.reference_fp8_linear: x [T, K] (float32/bfloat16/float16), wq float8_e4m3fn [N, K],
    w_scale_inv float32 [ceil(N/Bn), ceil(K/Bk)], optional bias [N]; returns [T, N] in x's dtype. No host sync.
    `config` overrides the launch config (BLOCK_SIZE_K is capped at Bk)."""
    bn, bk = check_triton_block(block)
    common.check_dtype("x_TK", x_TK)
    check_fp8_weight("wq_NK", wq_NK, w_scale_inv, (bn, bk))
    T, K = x_TK.shape
    N = wq_NK.shape[0]
    if wq_NK.shape[1] != K:
        raise ValueError(f"x_TK {tuple(x_TK.shape)} and wq_NK {tuple(wq_NK.shape)} do not fit: need wq [N, K].")
    if bias_N is not None and tuple(bias_N.shape) != (N,):
        raise ValueError(f"bias_N has shape {tuple(bias_N.shape)}: expected ({N},).")
    out = common.workspace((T, N), x_TK.dtype, x_TK.device)
    if T == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_() if bias_N is None else out.copy_(bias_N.to(out.dtype).expand(T, N))
    xq, xs = triton_per_token_group_quant(x_TK, bk)
    wq_NK, w_scale_inv = (t if t.is_contiguous() else t.contiguous() for t in (wq_NK, w_scale_inv))
    cfg = config or fp8_linear_config(T, x_TK.device)
    g = cfg.up
    BM, BN, BK = cfg.BLOCK_SIZE_M, g.BLOCK_SIZE_N, min(g.BLOCK_SIZE_K, bk)
    grid = (triton.cdiv(T, BM) * triton.cdiv(N, BN),)
    _fp8_gemm_kernel[grid](
        xq, xs, wq_NK, w_scale_inv, bias_N if bias_N is not None else xs, out, T, N, K,
        xq.stride(0), xs.stride(0), wq_NK.stride(0), w_scale_inv.stride(0), out.stride(0),
        SCALE_N=bn, SCALE_K=bk, BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, GROUP_M=g.GROUP_SIZE_M,
        HAS_BIAS=bias_N is not None, INTERPRET=common.interpreting(x_TK), num_warps=g.num_warps,
        num_stages=g.num_stages)
    return out
