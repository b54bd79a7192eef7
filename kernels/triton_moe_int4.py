"""Fused MoE with INT4 expert weights (W4A16: Kimi K2 Thinking / K2.5's compressed-tensors experts, GPTQ and AWQ
releases read into the same layout) in Triton: the float fused MoE (kernels/triton_moe.py) whose B tiles are
dequantized in the K loop, and two decode GEMVs (kernels/triton_moe_int4_tiny.py).

Legend: T tokens, D hidden, E local experts, G global experts, I expert intermediate size, F = 2I, K top-k,
P = T*K pairs, R padded rows (moe_align), W = (reduction dim) / 8 int32 words of a row, S = (reduction dim) / GROUP
groups.

Weights (kernels/int4.py has the layout): w13 int32 [E, F, D/8] ([gate; up] rows) + scales [E, F, D/GROUP] (the
model dtype) (+ zero points uint8 [E, F, D/GROUP]); w2 int32 [E, D, I/8] + [E, D, I/GROUP] (+ zeros). A row's words
are contiguous along the reduction dim, so a [BLOCK_N, BLOCK_K/8] word tile is a plain strided load: a quarter of a
bf16 tile's bytes. Each word's scale (and zero point) is loaded at its group's address ([BLOCK_N, BLOCK_K/8]: the
words of a group hit the same bytes, so DRAM sees each scale once), then `dequant_int4_words` decodes the tile in
fp32 (exact: (u - z) is a small integer, times the scale), one rounding to the activation dtype, and tl.dot with fp32
accumulation, as the float kernel. The activations stay in their dtype (W4A16).

Paths (`int4_path`, the one selector: from T by the INT4 config files `int4_moe_{default,interpreter}.json`, keyed
by rows per expert like MXFP4's, so the thresholds are data): "tiny" (T*K <= TINY.max_pairs: the two GEMVs, each
selected expert's packed bytes read once per pair: decode), "dequant" (buckets marked DEQUANT: prefill-sized
batches; every local expert dequantized once per call by `triton_int4_dequant.dequantize_int4_experts` into a
`DequantWorkspace` of the activation dtype, then the float sorted path, kernels/triton_moe_float.py, with the float
launch config: the decode of each weight is paid once, not once per M tile of its expert) and "sorted" (per-tile
dequantization in the K loop, above; between the two).

The rest is the pipeline's and the GEMM scaffold's (kernels/triton_moe_gemm.py), as for MXFP4 / NVFP4: this format
plugs its weight tile and dot (`int4_tile`, `int4_dot`) into the packed formats' K loops
(kernels/triton_moe_packed.py) and `Int4Format`; one program per tile without TMA.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar
from pathlib import Path

import torch
import triton
import triton.language as tl

from . import moe_config
from . import triton_common as common
from .int4 import GROUP_SIZES, check_int4
from .moe import SILU, MoEActivation
from .moe_config import DEFAULT_TINY, ConfigTable, MoELaunchConfig, _pick, format_config_table, get_moe_config
from .triton_common import dot
from .triton_int4_dequant import DequantWorkspace, dequant_int4_words, dequantize_int4_experts, group_of_words
from .triton_moe import check_routing, routed
from .triton_moe_float import FloatFormat
from .triton_moe_gemm import load_weights, sorted_down_gemm, sorted_up_gemm, store_h
from .triton_moe_packed import PackedFormat, check_path, packed_down_loop, packed_up_loop, select_path
from .triton_moe_int4_tiny import tiny_fused_moe_int4

@triton.jit
def int4_tile(q_ptrs, s_ptrs, z_ptrs, k0, k_left, n_ok, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, FMT: tl.constexpr):
    """TILE of INT4 (kernels/triton_moe_packed.py), FMT[5:] = (GROUP, HAS_ZP): the [BN, BK] fp32 weight tile of a
    K step: its words, each word's scale (and zero point) by its group (s_ptrs, z_ptrs: the rows' first group)."""
    GROUP: tl.constexpr = FMT[5]
    HAS_ZP: tl.constexpr = FMT[6]
    w_ok = tl.arange(0, BLOCK_K // 8) < k_left // 8  # (the reduction dim is a multiple of GROUP, so of 8: whole words)
    groups = group_of_words(k0, BLOCK_K, GROUP)
    q = load_weights(q_ptrs, n_ok, w_ok, EVEN_K, True)
    s = load_weights(s_ptrs + groups[None, :], n_ok, w_ok, EVEN_K, True).to(tl.float32)
    if HAS_ZP:
        z = load_weights(z_ptrs + groups[None, :], n_ok, w_ok, EVEN_K, True).to(tl.float32)
    else:
        z = tl.full([BLOCK_N, BLOCK_K // 8], 8.0, tl.float32)
    return dequant_int4_words(q, s, z, BLOCK_N, BLOCK_K)


@triton.jit
def int4_dot(a, w, acc, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FMT: tl.constexpr, INTERPRET: tl.constexpr,
             PREC: tl.constexpr):
    """DOT of INT4: the decoded tile rounded once to the activation dtype, tl.dot with fp32 accumulation."""
    return dot(a, tl.trans(w.to(a.dtype)), acc, INTERPRET, PREC)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_int4_up_kernel(x_ptr, wq_ptr, ws_ptr, wz_ptr, h_ptr, sorted_ptr, expert_ids_ptr, b13_ptr, num_pairs,
                        num_rows, inter, hidden, top_k, stride_xt, stride_qe, stride_qn, stride_se, stride_sn,
                        stride_hr, stride_be, alpha, limit, num_rows_ptr, num_experts,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, PERSISTENT: tl.constexpr,
                        TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr, GROUP: tl.constexpr,
                        HAS_ZP: tl.constexpr):
    # (num_rows_ptr, num_experts: the pipeline's, for PERSISTENT and TMA, which INT4 runs without; last, as MXFP4)
    sorted_up_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, inter, hidden), num_rows_ptr, num_rows,
                   (b13_ptr, stride_be, alpha, limit), (x_ptr, stride_xt),
                   (wq_ptr, ws_ptr, wz_ptr, ws_ptr, stride_qe, stride_qn, stride_se, stride_sn, 1, 0),
                   (h_ptr, stride_hr), packed_up_loop, store_h, (int4_tile, int4_dot, 8, 0, False, GROUP, HAS_ZP),
                   BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, EVEN_K, HAS_BIAS, ACT, PERSISTENT, TMA, INTERPRET, PREC)


@triton.jit(do_not_specialize=["num_pairs"])
def _moe_int4_down_kernel(h_ptr, wq_ptr, ws_ptr, wz_ptr, y_ptr, sorted_ptr, expert_ids_ptr, weights_ptr, b2_ptr,
                          num_pairs, num_rows, hidden, inter, top_k, stride_hr, stride_qe, stride_qn, stride_se,
                          stride_sn, stride_yr, stride_be, num_rows_ptr, num_experts,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                          EVEN_K: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr,
                          PERSISTENT: tl.constexpr, TMA: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
                          GROUP: tl.constexpr, HAS_ZP: tl.constexpr):
    sorted_down_gemm((sorted_ptr, expert_ids_ptr, num_pairs, top_k, hidden, inter), num_rows_ptr, num_rows,
                     (b2_ptr, stride_be, weights_ptr, y_ptr, stride_yr), (h_ptr, stride_hr),
                     (wq_ptr, ws_ptr, wz_ptr, ws_ptr, stride_qe, stride_qn, stride_se, stride_sn, 1, 0),
                     packed_down_loop, (int4_tile, int4_dot, 8, 0, False, GROUP, HAS_ZP), BLOCK_M, BLOCK_N, BLOCK_K,
                     GROUP_M, EVEN_K, ATOMIC, HAS_BIAS, PERSISTENT, TMA, INTERPRET, PREC)


def int4_config(cfg: MoELaunchConfig) -> MoELaunchConfig:
    """The launch config with BLOCK_SIZE_K at least 16 (two words, and tl.dot's K >= 16); FUSED_GATE_UP is ignored
    (two dots, one per half)."""
    return MoELaunchConfig(cfg.BLOCK_SIZE_M, replace(cfg.up, BLOCK_SIZE_K=max(16, cfg.up.BLOCK_SIZE_K),
                                                     FUSED_GATE_UP=False),
                           replace(cfg.down, BLOCK_SIZE_K=max(16, cfg.down.BLOCK_SIZE_K)))


@dataclass(frozen=True)
class Int4Format(PackedFormat):
    """INT4 experts: packed words, group scales, zero points (None: symmetric, z = 8) and the group size."""

    w13q_EFW: torch.Tensor
    w13s_EFS: torch.Tensor
    w13z_EFS: torch.Tensor | None
    w2q_EDW: torch.Tensor
    w2s_EDS: torch.Tensor
    w2z_EDS: torch.Tensor | None
    group: int
    KERNELS: ClassVar = (_moe_int4_up_kernel, _moe_int4_down_kernel)

    def fit(self, cfg: MoELaunchConfig) -> MoELaunchConfig:
        return int4_config(cfg)

    def weight(self, up: bool) -> dict:
        q, s, z = (self.w13q_EFW, self.w13s_EFS, self.w13z_EFS) if up else (self.w2q_EDW, self.w2s_EDS, self.w2z_EDS)
        return dict(wq_ptr=q, ws_ptr=s, wz_ptr=s if z is None else z, stride_qe=q.stride(0), stride_qn=q.stride(1),
                    stride_se=s.stride(0), stride_sn=s.stride(1), GROUP=self.group, HAS_ZP=z is not None)


def int4_config_file_name(num_experts: int, inter: int, name: str) -> str:
    """Tuned INT4 files: a prefix of their own (as FP8's and MXFP4's), so the bf16 tools' globs skip them."""
    return f"int4,E={num_experts},N={inter},device_name={name}.json"


def int4_config_table(num_experts: int, inter: int, name: str,
                      config_dir: str | Path | None = None) -> ConfigTable:
    """(key kind, sorted buckets) of the INT4 file for a shape on GPU `name`: a tuned `int4,E=..,N=..,..json`, else
    `int4_moe_default.json` (rows per expert); `int4_moe_interpreter.json` on CPU ('cpu')."""
    return format_config_table("int4", int4_config_file_name(num_experts, inter, name), name, config_dir)


int4_path = select_path  # which INT4 path a batch takes (the packed formats' selector)


def _check(x_TD, w13_q, w13_s, w13_z, w2_q, w2_s, w2_z, topk_weights_TK, topk_ids_TK) -> tuple[int, int, int, int]:
    common.check_dtype("x_TD", x_TD)
    g13 = check_int4(w13_q, w13_s, w13_z, "w13")
    g2 = check_int4(w2_q, w2_s, w2_z, "w2")
    if w13_q.dim() != 3 or w2_q.dim() != 3:
        raise ValueError(f"w13 {tuple(w13_q.shape)} / w2 {tuple(w2_q.shape)} are invalid: need [E, 2I, D/8] and "
                         "[E, D, I/8].")
    E, F, W13 = w13_q.shape
    D = x_TD.shape[1]
    if g13 != g2 or g13 not in GROUP_SIZES or F % 2 or W13 * 8 != D or tuple(w2_q.shape) != (E, D, F // 16):
        raise ValueError(f"shapes x_TD={tuple(x_TD.shape)}, w13={tuple(w13_q.shape)} (group {g13}), w2="
                         f"{tuple(w2_q.shape)} (group {g2}) do not fit: need w13 [E, 2I, D/8] and w2 [E, D, I/8] with "
                         f"one group size of {GROUP_SIZES} dividing D and I.")
    if (w13_z is None) != (w2_z is None):
        raise ValueError("w13_z / w2_z: give both zero points or neither (an asymmetric checkpoint has both).")
    check_routing(x_TD, topk_weights_TK, topk_ids_TK)
    return E, F // 2, D, g13


def triton_fused_moe_int4(x_TD: torch.Tensor, w13_q_EFW: torch.Tensor, w13_s_EFS: torch.Tensor, w2_q_EDW: torch.Tensor,
                          w2_s_EDS: torch.Tensor, topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                          expert_map_G: torch.Tensor | None = None, *, w13_z_EFS: torch.Tensor | None = None,
                          w2_z_EDS: torch.Tensor | None = None, b13_EF: torch.Tensor | None = None,
                          b2_ED: torch.Tensor | None = None, activation: MoEActivation = SILU,
                          out: torch.Tensor | None = None, config: MoELaunchConfig | None = None, combine: str = "sum",
                          path: str = "auto", workspace: DequantWorkspace | None = None) -> torch.Tensor:
    """Same contract as `reference_fused_moe_int4`: [T, D] in x's dtype (fp32, bf16, fp16); rows whose experts are
    all remote are 0. `out` and `combine` as `triton_fused_moe`; `config` overrides the INT4 launch config
    (`int4_config_table`); `path`: "auto" (`int4_path`), "tiny" (the two GEMVs; the config's TINY blocks, else
    DEFAULT_TINY's; sums deterministically whatever `combine` says), "sorted" (per-tile dequantization) or "dequant"
    (every local expert dequantized once into `workspace`'s buffers, a fresh scratch when None, then the float
    sorted path with the float launch config; `config` still picks the path). No device→host sync."""
    check_path(path)
    E, I, D, group = _check(x_TD, w13_q_EFW, w13_s_EFS, w13_z_EFS, w2_q_EDW, w2_s_EDS, w2_z_EDS, topk_weights_TK,
                            topk_ids_TK)
    r = routed(x_TD, topk_weights_TK, topk_ids_TK, E, I, b13_EF, b2_ED, activation, out, combine)
    T, K = r.T, r.K
    if T == 0:
        return r.out
    rows = lambda t: None if t is None else (t if t.is_contiguous() else t.contiguous())  # noqa: E731
    q13, s13, z13, q2, s2, z2 = map(rows, (w13_q_EFW, w13_s_EFS, w13_z_EFS, w2_q_EDW, w2_s_EDS, w2_z_EDS))
    if config is None:
        config = _pick(*int4_config_table(E, I, moe_config.device_name(x_TD.device)), T, K, E)
    chosen = int4_path(config, T, K, path)
    if chosen == "tiny":
        return tiny_fused_moe_int4(r.x_TD, q13, s13, z13, q2, s2, z2, group, r.weights_P, r.ids_P, expert_map_G,
                                   r.b13_EF, r.b2_ED, r.act_args, r.out, config.tiny or DEFAULT_TINY, K)
    if chosen == "dequant":
        # Every local expert, not only those with tokens: the shipped GPU DEQUANT bucket starts at 1024 rows per
        # expert, where an expert without a token is (1 - K/E)**T unlikely, so counting used experts would cost a
        # sync or a launch and save nothing; the grid depends on shapes alone (graph-safe).
        dt = x_TD.dtype
        take = (lambda name, shape: None) if workspace is None else (  # noqa: E731
            lambda name, shape: workspace.take(name, shape, dt, x_TD.device))
        w13_EFD = dequantize_int4_experts(q13, s13, z13, dt, take("w13", (E, 2 * I, D)))
        w2_EDI = dequantize_int4_experts(q2, s2, z2, dt, take("w2", (E, D, I)))
        cfg = replace(get_moe_config(E, I, T, K, x_TD.device), tiny=None, dequant=False)
        return r.sorted(FloatFormat(E, I, w13_EFD, w2_EDI), expert_map_G, cfg, combine)
    return r.sorted(Int4Format(E, I, q13, s13, z13, q2, s2, z2, group), expert_map_G, config, combine)
