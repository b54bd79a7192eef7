"""The MLA attention input in one op: the latent's RMSNorm (kv_a_layernorm), the rotary of the query's and the
shared key's rope parts, and the latent cache write of [normed latent | roped key]. Reference (the composition
of the references it replaces: the contract, the oracle and the CPU path); kernels/triton_mla_input.py does it
in one launch.

Legend: T tokens, N heads, C kv_lora_rank, P qk_rope_head_dim (the rope part), P' positions.

Rope styles (engine/models/rope_config.ROPE_STYLES): "neox" (and DeepSeek-V3's "interleaved", whose rope rows
are de-interleaved at load so that it runs as neox) rotates pairs (j, j + P/2) with a float32 [P', P] table
(cos | sin); "complex" (DeepSeek-V2, V2-Lite) rotates pairs (2i, 2i+1) as complex64 numbers with a complex64
[P', P/2] table, as transformers does.

Why one op: at batch 1 the latent norm, the table gather, the two rotations (three launches each in the
complex style) and the cache write are nine dependent launches per layer of a few kB each.
"""
from __future__ import annotations

import torch

from .mla import reference_write_latent
from .norm import reference_rms_norm
from .rotary import reference_rotary, reference_rotary_complex

ROPE_STYLES = ("neox", "interleaved", "complex")


def reference_mla_rope_write_latent(
    q_pe_TNP: torch.Tensor, ckv_TC: torch.Tensor, k_pe_TP: torch.Tensor, positions_T: torch.Tensor,
    table: torch.Tensor, style: str, norm_C: torch.Tensor, eps: float, latent_cache_BLR: torch.Tensor,
    slot_mapping_T: torch.Tensor, kv_scale: float = 1.0,
) -> torch.Tensor:
    """q_pe [T, N, P], ckv [T, C], k_pe [T, P] (strided views of the projections are fine). Writes each token's
    cache row [rms_norm(ckv) | rotary(k_pe)] (reference_write_latent: slot < 0 writes nothing, an fp8 cache
    stores row / kv_scale); returns rotary(q_pe), a new contiguous [T, N, P] tensor of q_pe's dtype."""
    if style not in ROPE_STYLES:
        raise ValueError(f"style={style!r} is invalid: choose from {', '.join(ROPE_STYLES)}.")
    ckv_TC = reference_rms_norm(ckv_TC, norm_C, eps)
    rotate = reference_rotary_complex if style == "complex" else reference_rotary
    q_pe_TNP, k_pe_T1P = rotate(q_pe_TNP, k_pe_TP[:, None, :], positions_T, table)
    reference_write_latent(ckv_TC, k_pe_T1P[:, 0], latent_cache_BLR, slot_mapping_T, kv_scale)
    return q_pe_TNP.contiguous()
