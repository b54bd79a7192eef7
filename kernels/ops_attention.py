"""The GQA attention family of the kernel seam (kernels/ops.py): rotary, the paged KV cache's writes, paged attention.

References in kernels/rotary.py (rotary, and rotary with the KV write), kernels/attention.py; Triton in kernels/triton_rotary.py,
triton_attention.py, triton_rope_kv.py (imported only when a Triton backend is built). Legend: T tokens, N query
heads, K kv heads, H head size, B blocks, L block size, P positions, R rotary dims.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .attention import AttentionMetadata, reference_paged_attention, reference_write_kv
from .attention_input import reference_norm_qkv_rope_kv
from .rotary import reference_rope_write_kv, reference_rotary


class AttentionKernels(Protocol):
    def rotary(self, q_TNH: torch.Tensor, k_TKH: torch.Tensor, positions_T: torch.Tensor,
               cos_sin_PH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated by their token positions: new tensors of the inputs' dtype."""
        ...

    def write_kv(self, k_TKH: torch.Tensor, v_TKH: torch.Tensor, k_cache_BLKH: torch.Tensor,
                 v_cache_BLKH: torch.Tensor, slot_mapping_T: torch.Tensor, k_scale: float = 1.0,
                 v_scale: float = 1.0) -> None:
        """This step's keys and values into their cache slots, in place (slot < 0: nowhere; fp8: x / scale)."""
        ...

    def rope_write_kv(self, q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, positions_T: torch.Tensor,
                      cos_sin_PR: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                      slot_mapping_T: torch.Tensor, q_norm_H: torch.Tensor | None = None,
                      k_norm_H: torch.Tensor | None = None, eps: float = 1e-06, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> torch.Tensor:
        """q/k norms, rotary and the KV write in one op: writes the normed, roped k and v; returns q so, [T, N, H]."""
        ...

    def norm_qkv_rope_kv(self, x_TD: torch.Tensor, residual_TD: torch.Tensor | None, norm_D: torch.Tensor,
                         norm_eps: float, w_RD: torch.Tensor, bias_R: torch.Tensor | None, num_q_heads: int,
                         num_kv_heads: int, v_head_dim: int, positions_T: torch.Tensor, cos_sin_PR: torch.Tensor,
                         k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor, slot_mapping_T: torch.Tensor,
                         q_norm_H: torch.Tensor | None = None, k_norm_H: torch.Tensor | None = None,
                         eps: float = 1e-06, k_scale: float = 1.0, v_scale: float = 1.0,
                         counters_G: torch.Tensor | None = None, *, w_scale_inv: torch.Tensor | None = None,
                         block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add and input norm, the q/k/v projection and rope_write_kv in one op: (q [T, N, H],
        x + residual); a decode batch's attention input (kernels/attention_input.py). w_scale_inv: w_RD is FP8
        (e4m3 in `block` scale blocks), the projection W8A8."""
        ...

    def paged_attention(self, q_TNH: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor,
                        meta: AttentionMetadata, scale: float, *, sinks_N: torch.Tensor | None = None,
                        sliding_window: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
        """Causal attention of each new token to its sequence's cached context: [T, N, H]."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_attention import triton_paged_attention, triton_write_kv
    from .triton_qkv_rope_kv import triton_norm_qkv_rope_kv
    from .triton_rope_kv import triton_rope_write_kv
    from .triton_rotary import triton_rotary

    # rope_write_kv: q/k norm + rotary + KV write, one launch (decode's attention input)
    # norm_qkv_rope_kv: the input norm, the q/k/v GEMV and rope_write_kv, one launch (a decode batch's)
    return dict(rotary=triton_rotary, write_kv=triton_write_kv, rope_write_kv=triton_rope_write_kv,
                norm_qkv_rope_kv=triton_norm_qkv_rope_kv, paged_attention=triton_paged_attention)


registry.register("attention", AttentionKernels, triton=_triton,
                  reference=dict(rotary=reference_rotary, write_kv=reference_write_kv,
                                 rope_write_kv=reference_rope_write_kv, norm_qkv_rope_kv=reference_norm_qkv_rope_kv,
                                 paged_attention=reference_paged_attention))
