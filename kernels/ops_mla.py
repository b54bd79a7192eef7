"""The MLA family of the kernel seam (kernels/ops.py): DeepSeek-V2/V3's and Kimi K2's latent cache and attention.

References in kernels/mla.py, kernels/mla_input.py; Triton in kernels/triton_mla.py, triton_mla_input.py (imported
only when a Triton backend is built). Legend: T tokens, N heads, C latent rank, P rope dims, R = C + P (a cache row),
B blocks, L block size.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from . import registry
from .attention import AttentionMetadata
from .mla import reference_mla_attention, reference_write_latent
from .mla_input import reference_mla_rope_write_latent


class MLAKernels(Protocol):
    def write_latent(self, ckv_TC: torch.Tensor, kpe_TP: torch.Tensor, latent_cache_BLR: torch.Tensor,
                     slot_mapping_T: torch.Tensor, kv_scale: float = 1.0) -> None:
        """This step's latents [T, C] and roped keys [T, P] into their cache rows, in place."""
        ...

    def mla_rope_write_latent(self, q_pe_TNP: torch.Tensor, ckv_TC: torch.Tensor, k_pe_TP: torch.Tensor,
                              positions_T: torch.Tensor, table: torch.Tensor, style: str, norm_C: torch.Tensor,
                              eps: float, latent_cache_BLR: torch.Tensor, slot_mapping_T: torch.Tensor,
                              kv_scale: float = 1.0) -> torch.Tensor:
        """Writes each token's row [rms_norm(ckv) | rotary(k_pe)]; returns rotary(q_pe), [T, N, P]."""
        ...

    def mla_attention(self, q_latent_TNC: torch.Tensor, q_pe_TNP: torch.Tensor, latent_cache_BLR: torch.Tensor,
                      meta: AttentionMetadata, scale: float, kv_scale: float = 1.0, *,
                      sinks_N: torch.Tensor | None = None) -> torch.Tensor:
        """Causal absorbed MLA over the paged latent cache: [T, N, C] (kernels/mla.py: the algebra); sinks_N, a
        sink logit per head in the softmax's denominator (Hunyuan Hy4), or None."""
        ...


def _triton() -> dict[str, Any]:
    from .triton_mla import triton_mla_attention, triton_write_latent
    from .triton_mla_input import triton_mla_rope_write_latent

    # mla_rope_write_latent: latent norm + rotary + latent write, one launch
    return dict(write_latent=triton_write_latent, mla_rope_write_latent=triton_mla_rope_write_latent,
                mla_attention=triton_mla_attention)


registry.register("mla", MLAKernels, triton=_triton,
                  reference=dict(write_latent=reference_write_latent,
                                 mla_rope_write_latent=reference_mla_rope_write_latent,
                                 mla_attention=reference_mla_attention))
