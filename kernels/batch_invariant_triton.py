"""The batch-invariant backend's Triton kernels on a GPU (issue 58 item 4): what `BatchInvariantTritonKernels`
(kernels/ops.py) runs where `BatchInvariantKernels` runs plain torch.

- Routed experts (`invariant_triton_fused_moe`): the normal fused-MoE pipeline (kernels/triton_moe.py) on ONE launch
  config whatever the token count (`invariant_moe_config`), never the tuned tables of kernels/moe_config.py, which
  are keyed by the token count (on an H100, Qwen3-30B-A3B's file gives a decode batch 64-wide K tiles and a
  16-token one 128-wide: another reduction order) and never the tiny-batch GEMV path (chosen by the pair count).
  The one config is the built-in `_GPU_MOE`, or the one a file `batch_invariant,E=..,N=..,device_name=..json` in
  kernels/configs/ holds for the shape and GPU (benchmarks/tune_moe_invariant.py: one config timed over a mix of
  token counts, decode and prefill; a file with more than one config, or with a TINY entry, is refused: it would
  make the config a function of the batch again).
  No split-K exists in that pipeline; the combine is its "sum" pass, which adds each token's top-k rows in k order in
  fp32 (never the atomic combine). A row of a GEMM tile is reduced on its own over the same K chunks, so a token's
  expert outputs do not depend on the other rows its expert got.
- Paged attention: kernels/triton_invariant_attention.py (fixed keys per split, merged in split order; one program
  per token, so decode and prefill rows run the same code).
- Dense linears: kernels/triton_invariant_matmul.py (fixed tiles, K in order), entered through
  `TritonBatchInvariantMode`, the mode of kernels/batch_invariant.py with F.linear / mm / matmul-by-a-matrix sent to
  that kernel for float32 / bfloat16 / float16 tensors on a GPU (its reductions and element-wise rules stay).
- The normal backend's row-local kernels as they are (kernels/ops.py BatchInvariantTritonKernels): RMSNorm, rotary,
  KV write, the fused decode input (q/k norm + rotary + KV write), router top-k, SiLU-mul: one program per token (or
  row), blocks set by the widths only.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import triton_common as common
from .batch_invariant import BatchInvariantMode
from .moe_config import CONFIG_DIR, GemmConfig, MoELaunchConfig, config_file_name, device_name, load_config_file

# The one MoE launch config (no TINY entry: the tiny path is never taken). 64-row blocks: a decode batch pads each
# expert's few rows to 64 (the GEMMs there are bound by the weight reads, not the rows), a prefill fills them.
_GPU_MOE = MoELaunchConfig(64, GemmConfig(64, 64, 8, 4, 3), GemmConfig(64, 64, 8, 4, 3))
# fp32 dots are FMA loops holding their operands in registers: smaller tiles on 8 warps (on 4 warps the down GEMM
# spilled 4 bytes on sm_90; tests/kernels/test_triton_compile.py checks sm_90 and sm_100 for spills).
_GPU_MOE_FP32 = MoELaunchConfig(32, GemmConfig(64, 32, 8, 8, 2), GemmConfig(64, 32, 8, 8, 2))
_INTERPRETER_MOE = MoELaunchConfig(16, GemmConfig(32, 32, 2, 4, 1), GemmConfig(32, 32, 2, 4, 1))


INVARIANT_PREFIX = "batch_invariant,"  # a tuned invariant config's file: this prefix + the tuned tables' name


def invariant_file_name(num_experts: int, inter: int, name: str) -> str:
    return INVARIANT_PREFIX + config_file_name(num_experts, inter, name)


@functools.lru_cache(maxsize=64)
def tuned_invariant_config(num_experts: int, inter: int, name: str,
                           config_dir: str | None = None) -> MoELaunchConfig | None:
    """The one launch config benchmarks/tune_moe_invariant.py wrote for this shape on GPU `name` (None: no file)."""
    path = Path(config_dir) if config_dir is not None else CONFIG_DIR
    path = path / invariant_file_name(num_experts, inter, name)
    found = load_config_file(str(path))
    if found is None:
        return None
    _, buckets = found
    if len(buckets) != 1 or buckets[0][1].tiny is not None:
        raise ValueError(f"{path.name}: a batch-invariant MoE config file must hold one config and no TINY entry (every "
                         f"token count runs it: a config per bucket breaks the mode's invariance); it holds "
                         f"{len(buckets)} bucket(s){' and a TINY entry' if buckets[0][1].tiny is not None else ''}.")
    return buckets[0][1]


def builtin_moe_config(on_gpu: bool, dtype: torch.dtype) -> MoELaunchConfig:
    """The mode's config where no tuned file holds one: the interpreter's, float32's or the 16-bit one."""
    if not on_gpu:
        return _INTERPRETER_MOE
    return _GPU_MOE_FP32 if dtype == torch.float32 else _GPU_MOE


def invariant_moe_config(x_TD: torch.Tensor, num_experts: int | None = None, inter: int | None = None) -> MoELaunchConfig:
    """The fused MoE's launch config in batch-invariant mode: a function of the dtype, the device and the layer's
    shape only (the shape's tuned invariant file on its GPU, else the built-in one), never of the token count."""
    if common.interpreting(x_TD) or x_TD.dtype == torch.float32:
        return builtin_moe_config(not common.interpreting(x_TD), x_TD.dtype)
    if num_experts is not None and inter is not None:
        tuned = tuned_invariant_config(num_experts, inter, device_name(x_TD.device))
        if tuned is not None:
            return tuned
    return builtin_moe_config(True, x_TD.dtype)


def invariant_triton_fused_moe(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor,
                               topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                               expert_map_G: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
    """`reference_fused_moe`'s contract (biases, activation) on the sorted path with the fixed config and the
    ordered sum (module docstring)."""
    from .triton_moe import triton_fused_moe

    E, F, _ = w13_EFD.shape
    return triton_fused_moe(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, expert_map_G,
                            config=invariant_moe_config(x_TD, E, F // 2), combine="sum", path="sorted", **kw)


def _on_triton(x: Any, w: Any) -> bool:
    """Whether a product of x by weight w goes to the invariant Triton matmul: float32 / bfloat16 / float16 of one
    dtype, on a GPU (or on CPU under the interpreter, in tests)."""
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or w.dim() != 2 or x.dim() < 1:
        return False
    if x.dtype not in common.SUPPORTED_DTYPES or w.dtype != x.dtype or x.device != w.device:
        return False
    return x.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _linear(x: torch.Tensor, w_NK: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    from .triton_invariant_matmul import triton_invariant_linear

    lead = x.shape[:-1]
    y = triton_invariant_linear(x.reshape(-1, x.shape[-1]), w_NK, bias)
    return y.reshape(*lead, w_NK.shape[0])


class TritonBatchInvariantMode(BatchInvariantMode):
    """BatchInvariantMode with the products by a weight matrix (F.linear, mm, matmul by a 2-D right operand) on the
    invariant Triton matmul; everything else as the mode does it (kernels/batch_invariant.py)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _on_triton(args[0], args[1]):
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _linear(args[0], args[1], bias)
        if func in (torch.mm, torch.Tensor.mm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__) \
                and len(args) == 2 and _on_triton(args[0], args[1]) and (args[0].dim() == 2 or func not in (
                    torch.mm, torch.Tensor.mm)):
            return _linear(args[0], args[1].t())
        return super().__torch_function__(func, types, args, kwargs)


__all__ = ["INVARIANT_PREFIX", "TritonBatchInvariantMode", "builtin_moe_config", "invariant_file_name",
           "invariant_moe_config", "invariant_triton_fused_moe", "tuned_invariant_config"]
