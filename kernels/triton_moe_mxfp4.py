"""Fused MoE with MXFP4 expert weights (gpt-oss) in Triton: the float fused MoE (kernels/triton_moe.py) whose B tiles
are dequantized in the K loop.

Legend: T tokens, D hidden, E local experts, G global experts, I expert intermediate size, F = 2I, K top-k,
P = T*K pairs, R padded rows (moe_align), S = reduction dim / 32 scale groups, Q = 16 packed bytes per group,
B = S*Q bytes of a row.

Weights (kernels/mxfp4.py, the published layout with gate/up rows de-interleaved at load): w13 blocks
[E, F, D/32, 16] uint8 + scales [E, F, D/32] uint8; w2 blocks [E, D, I/32, 16] + scales [E, D, I/32]. A row's
bytes are contiguous along the reduction dim, so a [BLOCK_N, BLOCK_K/2] byte tile and its [BLOCK_N, BLOCK_K/32]
E8M0 scales are plain strided loads: a quarter of the bytes a bf16 tile costs (plus 1/32 for the scales).
Two more paths for the batch sizes where this one is slow (`mxfp4_path`, chosen from T by the MXFP4 config
files): the decode GEMVs (kernels/triton_moe_mxfp4_tiny.py) and the dequantize-once prefill path (`DEQUANT`).

In the K loop (Hopper and older, `NATIVE=False`): the blocks are read as int32 words ([BLOCK_N, BLOCK_K/8] a
step) and decoded by `triton_mxfp4_dequant.dequant_words`: shifts and masks place each e2m1 code in an fp16 bit
pattern (e2m1 x 2**-14, exact), widened to fp32, times 2**14 and the group's 2**(s - 127), then the activation
dtype, exact (an e2m1 value times a power of two needs 2 significant bits) unless it over/underflows that
dtype → tl.dot with fp32 accumulation, as the float kernel. ~2 integer ops a value where the former per-byte
decode (compare-and-select on the code) spent ~10: the sm_90 K loop issues 20-25 % fewer instructions and 2.3-2.9x
fewer on the integer pipe (the per-tile path's bound). The activations stay in their dtype (W4A16); x is never
quantized.
`NATIVE=True` (opt-in, `native=True`; bf16/fp16 activations): `tl.dot_scaled(x, None, "bf16", packed, scales,
"e2m1")` instead, Triton's own microscaling path. Verified: it matches the reference in the interpreter (same
operand layouts: bytes packed along K, scales [N, K/32]), and compiles for sm_100 (Triton 3.6 and 3.9, offline) to
`tcgen05.mma ... kind::f16`: with bf16 activations Triton upcasts the e2m1 operand and runs Blackwell's bf16 MMA,
not the block-scaled `kind::mxf8f6f4` / `kind::mxf4` MMA, which needs both operands microscaled (activations
quantized to MXFP8/MXFP4, a numerics change not made here). Not run on Blackwell hardware, hence opt-in.

The rest is the pipeline's (kernels/triton_moe.py) and the GEMM scaffold's (kernels/triton_moe_gemm.py), as for
float weights: moe_align, gather of x rows by pair // K, [gate; up] accumulators with biases and the activation
in the epilogue, h_RI in sorted order, the down GEMM times the routed weight, and the deterministic top-k sum
or fp32 atomics. This format plugs its dot (`mxfp4_dot`, on `scaled_tile`'s bytes or words and scales) into the
packed formats' K loops (kernels/triton_moe_packed.py) and `Mxfp4Format`; it runs one program per tile without TMA
(the config's PERSISTENT and TMA keys are not applied to it).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import triton_common as common
from .moe import SILU, MoEActivation
from . import moe_config
from .moe_config import DEFAULT_TINY, ConfigTable, MoELaunchConfig, _pick, format_config_table, get_moe_config
from .mxfp4 import GROUP, _check_packed
from .triton_common import dot
from .triton_moe import check_routing, routed
from .triton_moe_float import FloatFormat
from .triton_moe_gemm import sorted_down_gemm, sorted_up_gemm, store_h
from .triton_moe_packed import (PackedFormat, check_path, native_a_format, packed_down_loop, packed_up_loop,
                                scaled_tile, select_path)
from .triton_moe_mxfp4_tiny import tiny_fused_moe_mxfp4
from .triton_mxfp4_dequant import dequant_words_bf16, dequantize_experts, word_view

SCALE_GROUP: tl.constexpr = tl.constexpr(GROUP)  # K values a scale (the packed K loops' SG)


@triton.jit
def mxfp4_dot(a, w, acc, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FMT: tl.constexpr, INTERPRET: tl.constexpr,
              PREC: tl.constexpr):
    """DOT of MXFP4 (kernels/triton_moe_packed.py), FMT[5:] = (NATIVE, A_FORMAT); w = (q, s) of `scaled_tile`: q
    [BN, BK/2] bytes when NATIVE, else [BN, BK/8] int32 words (`dequant_words`: ~2 integer ops a value), s the
    [BN, BK/32] E8M0 scales."""
    q, s = w
    NATIVE: tl.constexpr = FMT[5]
    A_FORMAT: tl.constexpr = FMT[6]
    # (one return: Triton traces the statements after a return inside a constexpr `if`, and the word decode
    # cannot bitcast the native path's bytes)
    if NATIVE:
        acc = tl.dot_scaled(a, None, A_FORMAT, tl.trans(q), s, "e2m1", acc)
    else:
        acc = dot(a, tl.trans(dequant_words_bf16(q, s, BLOCK_N, BLOCK_K, INTERPRET, FMT[7]).to(a.dtype)), acc,
                  INTERPRET, PREC)
    return acc


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_mxfp4_up_kernel(x_ptr, wq_ptr, ws_ptr, h_ptr, sorted_ptr, expert_ids_ptr, b13_ptr, num_pairs, num_rows,
                         inter, hidden, top_k, stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_ss,
                         stride_hr, stride_be, alpha, limit, num_rows_ptr, num_experts,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PERSISTENT: tl.constexpr,
                         TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr, NATIVE: tl.constexpr,
                         A_FORMAT: tl.constexpr, PAIRS: tl.constexpr = False):
    # (num_rows_ptr, num_experts: the pipeline's, for PERSISTENT and TMA, which MXFP4 runs without; taken last, as
    # FP8 takes the bias arguments, so the parameters before them keep their order: see WeightFormat)
    sorted_up_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, inter, hidden), num_rows_ptr, num_rows,
                   (b13_ptr, stride_be, alpha, limit), (x_ptr, stride_xt),
                   (wq_ptr, ws_ptr, ws_ptr, ws_ptr, stride_qe, stride_qn, stride_se, stride_sn, stride_ss, 0),
                   (h_ptr, stride_hr), packed_up_loop, store_h,
                   (scaled_tile, mxfp4_dot, 2 if NATIVE else 8, SCALE_GROUP, False, NATIVE, A_FORMAT, PAIRS), BLOCK_M,
                   BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, HAS_BIAS, ACT, PERSISTENT, TMA, INTERPRET, PREC)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_mxfp4_down_kernel(h_ptr, wq_ptr, ws_ptr, y_ptr, sorted_ptr, expert_ids_ptr, weights_ptr, b2_ptr, num_pairs,
                           num_rows, hidden, inter, top_k, stride_hr, stride_qe, stride_qn, stride_se, stride_sn,
                           stride_ss, stride_yr, stride_be, num_rows_ptr, num_experts,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                           EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                           PERSISTENT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
                           NATIVE: tl.constexpr, A_FORMAT: tl.constexpr, PAIRS: tl.constexpr = False):
    sorted_down_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, hidden, inter), num_rows_ptr, num_rows,
                     (b2_ptr, stride_be, weights_ptr, y_ptr, stride_yr), (h_ptr, stride_hr),
                     (wq_ptr, ws_ptr, ws_ptr, ws_ptr, stride_qe, stride_qn, stride_se, stride_sn, stride_ss, 0),
                     packed_down_loop,
                     (scaled_tile, mxfp4_dot, 2 if NATIVE else 8, SCALE_GROUP, False, NATIVE, A_FORMAT, PAIRS), BLOCK_M,
                     BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, ATOMIC, HAS_BIAS, PERSISTENT, TMA, INTERPRET, PREC)


def _bytes_view(blocks: torch.Tensor) -> torch.Tensor:
    """[E, N, S, 16] -> [E, N, S*16] bytes with the last dim contiguous (a view when the blocks are contiguous)."""
    E, N, S, Q = blocks.shape
    if blocks.stride(-1) != 1 or blocks.stride(-2) != Q:
        blocks = blocks.contiguous()
    return blocks.view(E, N, S * Q) if blocks.stride(1) == S * Q else blocks.reshape(E, N, S * Q)


def mxfp4_config(cfg: MoELaunchConfig) -> MoELaunchConfig:
    """The float kernel's launch config with BLOCK_SIZE_K at least one scale group (32); FUSED_GATE_UP is
    ignored here (two dots, one per half)."""
    return MoELaunchConfig(cfg.BLOCK_SIZE_M, replace(cfg.up, BLOCK_SIZE_K=max(GROUP, cfg.up.BLOCK_SIZE_K), FUSED_GATE_UP=False),
                     replace(cfg.down, BLOCK_SIZE_K=max(GROUP, cfg.down.BLOCK_SIZE_K)))


@dataclass(frozen=True)
class Mxfp4Format(PackedFormat):
    """MXFP4 experts with their blocks as int32 word views (`word_view`: B = D/8 for w13, I/8 for w2), or byte views
    with `native` (`_bytes_view`: B = D/2, I/2, what tl.dot_scaled takes); `native` picks
    tl.dot_scaled for activations of dtype `a_format` (module docstring)."""

    w13q_EFB: torch.Tensor
    w13s_EFS: torch.Tensor
    w2q_EDB: torch.Tensor
    w2s_EDS: torch.Tensor
    native: bool
    a_format: str
    pairs: bool = False  # the blocks in mxfp4.to_pair_order's nibble order (the decode packs no bf16 pairs by PRMT)
    KERNELS: ClassVar = (_moe_mxfp4_up_kernel, _moe_mxfp4_down_kernel)

    def fit(self, cfg: MoELaunchConfig) -> MoELaunchConfig:
        return mxfp4_config(cfg)

    def weight(self, up: bool) -> dict:
        """A GEMM's weight operands (bytes, scales and their strides) and this format's constexprs."""
        q, s = (self.w13q_EFB, self.w13s_EFS) if up else (self.w2q_EDB, self.w2s_EDS)
        return dict(wq_ptr=q, ws_ptr=s, stride_qe=q.stride(0), stride_qn=q.stride(1), stride_se=s.stride(0),
                    stride_sn=s.stride(1), stride_ss=s.stride(2), NATIVE=self.native, A_FORMAT=self.a_format,
                    PAIRS=self.pairs)


def mxfp4_config_file_name(num_experts: int, inter: int, name: str) -> str:
    """Tuned MXFP4 files: a prefix of their own (as FP8's), so the bf16 tools' `E=*,N=*,...` globs skip them."""
    return f"mxfp4,E={num_experts},N={inter},device_name={name}.json"


def mxfp4_config_table(num_experts: int, inter: int, name: str,
                       config_dir: str | Path | None = None) -> ConfigTable:
    """(key kind, sorted buckets) of the MXFP4 file for a shape on GPU `name`: a tuned `mxfp4,E=..,N=..,..json`,
    else `mxfp4_moe_default.json` (rows per expert); `mxfp4_moe_interpreter.json` on CPU ('cpu')."""
    return format_config_table("mxfp4", mxfp4_config_file_name(num_experts, inter, name), name, config_dir)


mxfp4_path = select_path  # which MXFP4 path a batch takes (the packed formats' selector)


def _check(x_TD, w13_blocks, w13_scales, w2_blocks, w2_scales, topk_weights_TK, topk_ids_TK) -> tuple[int, int, int]:
    common.check_dtype("x_TD", x_TD)
    _check_packed(w13_blocks, w13_scales, "w13")
    _check_packed(w2_blocks, w2_scales, "w2")
    if w13_blocks.dim() != 4 or w2_blocks.dim() != 4:
        raise ValueError(f"w13 blocks {tuple(w13_blocks.shape)} / w2 blocks {tuple(w2_blocks.shape)} are invalid: "
                         "need [E, F, D/32, 16] and [E, D, I/32, 16].")
    E, F, S13, _ = w13_blocks.shape
    D = x_TD.shape[1]
    if F % 2 or S13 * GROUP != D or tuple(w2_blocks.shape[:3]) != (E, D, F // 2 // GROUP) or (F // 2) % GROUP:
        raise ValueError(f"shapes x_TD={tuple(x_TD.shape)}, w13 blocks={tuple(w13_blocks.shape)}, w2 blocks="
                         f"{tuple(w2_blocks.shape)} do not fit: need w13 [E, 2I, D/32, 16] and w2 [E, D, I/32, 16] "
                         "with D and I multiples of 32.")
    check_routing(x_TD, topk_weights_TK, topk_ids_TK)
    return E, F // 2, D


def triton_fused_moe_mxfp4(x_TD: torch.Tensor, w13_blocks_EFSQ: torch.Tensor, w13_scales_EFS: torch.Tensor,
                           w2_blocks_EDSQ: torch.Tensor, w2_scales_EDS: torch.Tensor, topk_weights_TK: torch.Tensor,
                           topk_ids_TK: torch.Tensor, expert_map_G: torch.Tensor | None = None, *,
                           b13_EF: torch.Tensor | None = None, b2_ED: torch.Tensor | None = None,
                           activation: MoEActivation = SILU, out: torch.Tensor | None = None,
                           config: MoELaunchConfig | None = None, combine: str = "sum", native: bool = False,
                           path: str = "auto", pair_order: bool = False) -> torch.Tensor:
    """Same contract as `reference_fused_moe_mxfp4`: [T, D] in x's dtype (fp32, bf16, fp16); rows whose
    experts are all remote are 0. `out` and `combine` as `triton_fused_moe`; `config` overrides the MXFP4 launch
    config (`mxfp4_config_table`); `native=True` takes the tl.dot_scaled path (module docstring; bf16/fp16
    activations only; the per-tile path). `path`: "auto" (`mxfp4_path`), "tiny" (the two GEMVs,
    kernels/triton_moe_mxfp4_tiny.py; the config's TINY blocks, else DEFAULT_TINY's; sums deterministically
    whatever `combine` says), "sorted" (per-tile dequantization) or "dequant" (every local expert dequantized
    once into a scratch of x's dtype, then the float sorted path with the float launch config). `pair_order`: the
    blocks are in mxfp4.to_pair_order's nibble order (permuted once at load, moe/layer.py: every path decodes it;
    the sorted path then packs no bf16 pairs by byte permutes), not with `native` (tl.dot_scaled reads the
    checkpoint's order). No device→host sync.
    """
    check_path(path)
    if pair_order and native:
        raise ValueError("pair_order=True is invalid with native=True: tl.dot_scaled reads the checkpoint's nibble order.")
    E, I, _ = _check(x_TD, w13_blocks_EFSQ, w13_scales_EFS, w2_blocks_EDSQ, w2_scales_EDS, topk_weights_TK,
                     topk_ids_TK)
    dt = x_TD.dtype
    a_format = native_a_format(dt, native)
    r = routed(x_TD, topk_weights_TK, topk_ids_TK, E, I, b13_EF, b2_ED, activation, out, combine)
    T, K = r.T, r.K
    if T == 0:
        return r.out
    given = config is not None
    if not given:
        config = _pick(*mxfp4_config_table(E, I, moe_config.device_name(x_TD.device)), T, K, E)
    chosen = "sorted" if native else mxfp4_path(config, T, K, path)
    if chosen == "tiny":
        return tiny_fused_moe_mxfp4(r.x_TD, w13_blocks_EFSQ, w13_scales_EFS, w2_blocks_EDSQ, w2_scales_EDS, r.weights_P,
                                    r.ids_P, expert_map_G, r.b13_EF, r.b2_ED, r.act_args, r.out,
                                    config.tiny or DEFAULT_TINY, K, pair_order)
    if chosen == "dequant":
        # Every local expert, not only those with tokens: the shipped DEQUANT buckets start at 128 rows per expert,
        # where an expert without a token is about e**-128 unlikely under even routing, so a count of used experts would
        # cost a launch and save nothing; a shape-only grid stays graph-safe. The scratch is allocated per call:
        # the caching allocator hands the same blocks to the next layer (one layer's worth at a time).
        w13_EFD = dequantize_experts(w13_blocks_EFSQ, w13_scales_EFS, dt, pairs=pair_order)
        w2_EDI = dequantize_experts(w2_blocks_EDSQ, w2_scales_EDS, dt, pairs=pair_order)
        cfg = replace(config if given else get_moe_config(E, I, T, K, x_TD.device), tiny=None, dequant=False)
        return r.sorted(FloatFormat(E, I, w13_EFD, w2_EDI), expert_map_G, cfg, combine)
    view = _bytes_view if native else word_view  # (the K loops' operand: bytes for tl.dot_scaled, else words)
    fmt = Mxfp4Format(E, I, view(w13_blocks_EFSQ), w13_scales_EFS, view(w2_blocks_EDSQ), w2_scales_EDS,
                      bool(native), a_format, pair_order)
    return r.sorted(fmt, expert_map_G, config, combine)
