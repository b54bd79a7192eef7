"""The batch-invariant backend's Triton kernels on a GPU (issue 58 item 4): what `BatchInvariantTritonKernels`
(kernels/ops.py) runs where `BatchInvariantKernels` runs plain torch.

- Routed experts (`invariant_triton_fused_moe`): the normal fused-MoE pipeline (kernels/triton_moe.py) on ONE launch
  config whatever the token count (`invariant_moe_config`), never the tuned tables of kernels/moe_config.py, which
  are keyed by the token count (on an H100, Qwen3-30B-A3B's file gives a decode batch 64-wide K tiles and a
  16-token one 128-wide: another reduction order) and never the tiny-batch GEMV path (chosen by the pair count).
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

import os
from typing import Any

import torch
import torch.nn.functional as F

from . import triton_common as common
from .batch_invariant import BatchInvariantMode
from .moe_config import GemmConfig, MoELaunchConfig

# The one MoE launch config (no TINY entry: the tiny path is never taken). 64-row blocks: a decode batch pads each
# expert's few rows to 64 (the GEMMs there are bound by the weight reads, not the rows), a prefill fills them.
_GPU_MOE = MoELaunchConfig(64, GemmConfig(64, 64, 8, 4, 3), GemmConfig(64, 64, 8, 4, 3))
# fp32 dots are FMA loops holding their operands in registers: smaller tiles on 8 warps (on 4 warps the down GEMM
# spilled 4 bytes on sm_90; tests/kernels/test_triton_compile.py checks sm_90 and sm_100 for spills).
_GPU_MOE_FP32 = MoELaunchConfig(32, GemmConfig(64, 32, 8, 8, 2), GemmConfig(64, 32, 8, 8, 2))
_INTERPRETER_MOE = MoELaunchConfig(16, GemmConfig(32, 32, 2, 4, 1), GemmConfig(32, 32, 2, 4, 1))


def invariant_moe_config(x_TD: torch.Tensor) -> MoELaunchConfig:
    """The fused MoE's launch config in batch-invariant mode: a function of the dtype and the device only."""
    if common.interpreting(x_TD):
        return _INTERPRETER_MOE
    return _GPU_MOE_FP32 if x_TD.dtype == torch.float32 else _GPU_MOE


def invariant_triton_fused_moe(x_TD: torch.Tensor, w13_EFD: torch.Tensor, w2_EDI: torch.Tensor,
                               topk_weights_TK: torch.Tensor, topk_ids_TK: torch.Tensor,
                               expert_map_G: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
    """`reference_fused_moe`'s contract (biases, activation) on the sorted path with the fixed config and the
    ordered sum (module docstring)."""
    from .triton_moe import triton_fused_moe

    return triton_fused_moe(x_TD, w13_EFD, w2_EDI, topk_weights_TK, topk_ids_TK, expert_map_G,
                            config=invariant_moe_config(x_TD), combine="sum", path="sorted", **kw)


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


__all__ = ["TritonBatchInvariantMode", "invariant_moe_config", "invariant_triton_fused_moe"]
