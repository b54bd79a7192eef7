"""Rotary position embedding (NeoX / Hugging Face `rotate_half` layout; DeepSeek's complex pairs), and the GQA
attention input in one op (`reference_rope_write_kv`): per-head q/k RMSNorm (Qwen3; optional), rotary over the
first R dims of each head, and the paged-KV write of k and v. That one is the reference (the composition of the
three references it replaces: the contract, the oracle and the CPU path); kernels/triton_rope_kv.py does it in one
launch.

Legend: T tokens, N query heads, K kv heads, H head dim, R rotary dims (R <= H, even; GLM's partial rotary has
R < H), P positions, B cache blocks, L block size.

Why one op: at batch 1 each of these is a launch that moves a few kB (a decode layer's floor is tens of MB read in
tens of microseconds), so four to five dependent launches per layer (q norm, k norm, rotary, v copy, KV write) cost
more than their bytes; fused, q and k are read once from the qkv projection's output and written once, q to its
output and k, v straight into the cache.
"""
from __future__ import annotations

import torch

from .attention import reference_write_kv
from .norm import reference_rms_norm, rms_normalize
from .step_memo import STEP_MEMO


def rotary_cos_sin_cache(head_dim: int, max_positions: int, base: float, device=None) -> torch.Tensor:
    """[P, H] float32 table: cos in the first H/2 columns, sin in the last H/2.

    Built in float32 exactly as the Hugging Face models build it, so float64
    runs see the same (float32-rounded) angles as `transformers`.
    """
    inv_freq_h = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    pos_P = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs_Ph = pos_P[:, None] * inv_freq_h[None, :]
    return torch.cat([freqs_Ph.cos(), freqs_Ph.sin()], dim=-1)


def reference_rotary(
    q_TNH: torch.Tensor, k_TKH: torch.Tensor, positions_T: torch.Tensor, cos_sin_PH: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by their token positions; returns new tensors of the inputs' dtype."""
    cos_T1H, sin_T1H = rotary_rows(positions_T, cos_sin_PH, q_TNH.dtype)
    return _rotate(q_TNH, cos_T1H, sin_T1H), _rotate(k_TKH, cos_T1H, sin_T1H)


def rotary_rows(positions_T: torch.Tensor, cos_sin_PH: torch.Tensor, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos_T1H, sin_T1H) of `dtype`: each token's table row, each half repeated to the rotary width. The same
    for every layer of a step: built by its first (kernels/step_memo.py)."""
    def make():
        half = cos_sin_PH.shape[-1] // 2
        cs_TH = cos_sin_PH.index_select(0, positions_T)
        cos_T1H = torch.cat([cs_TH[:, :half], cs_TH[:, :half]], dim=-1).to(dtype)[:, None, :]
        sin_T1H = torch.cat([cs_TH[:, half:], cs_TH[:, half:]], dim=-1).to(dtype)[:, None, :]
        return cos_T1H, sin_T1H
    return STEP_MEMO.get("rotary_rows", (positions_T, cos_sin_PH), dtype, make)


def _rotate(x_TXH: torch.Tensor, cos_T1H: torch.Tensor, sin_T1H: torch.Tensor) -> torch.Tensor:
    half = x_TXH.shape[-1] // 2
    rot_TXH = torch.cat([-x_TXH[..., half:], x_TXH[..., :half]], dim=-1)
    return x_TXH * cos_T1H + rot_TXH * sin_T1H


def reference_rotary_complex(
    q_TNR: torch.Tensor, k_TKR: torch.Tensor, positions_T: torch.Tensor, table_Ph: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' DeepSeek-V2 apply_rotary_emb: pairs (2i, 2i+1) as complex64, times the token's row of the
    complex64 table [P, R/2] (polar(1, angle) x the rope type's factor), back to the input dtype (float32
    arithmetic even for float64 activations, as there). New tensors; the inputs are not modified."""
    table_T1h = table_Ph.index_select(0, positions_T)[:, None, :]
    return _rotate_complex(q_TNR, table_T1h), _rotate_complex(k_TKR, table_T1h)


def _rotate_complex(x_TXR: torch.Tensor, table_T1h: torch.Tensor) -> torch.Tensor:
    x_TXh2 = x_TXR.float().reshape(*x_TXR.shape[:-1], -1, 2).contiguous()
    out_TXh = torch.view_as_complex(x_TXh2) * table_T1h
    return torch.view_as_real(out_TXh).flatten(-2).to(x_TXR.dtype)


def reference_rope_write_kv(
    q_TNH: torch.Tensor, k_TKH: torch.Tensor, v_TKH: torch.Tensor, positions_T: torch.Tensor,
    cos_sin_PR: torch.Tensor, k_cache_BLKH: torch.Tensor, v_cache_BLKH: torch.Tensor, slot_mapping_T: torch.Tensor,
    q_norm_H: torch.Tensor | None = None, k_norm_H: torch.Tensor | None = None, eps: float = 1e-6,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> torch.Tensor:
    """q, k [T, *, H], v [T, K, Hv] (Hv = H but for narrower values; strided views of the qkv projection are
    fine); q_norm_H / k_norm_H: the per-head RMSNorm
    weights (both or neither), applied before the rotation; cos_sin_PR: the float32 rotary table (cos in the
    first R/2 columns, sin in the last; rotary.rotary_cos_sin_cache, or models' RotaryEmbedding.table_PR), which
    rotates the first R dims of each head (the rest pass through). Writes the normed, roped k and v into their
    cache slots (reference_write_kv: slot < 0 writes nothing, an fp8 cache stores x / scale); returns the normed,
    roped q, a new contiguous [T, N, H] tensor of q's dtype."""
    if (q_norm_H is None) != (k_norm_H is None):
        raise ValueError("q_norm_H and k_norm_H must be given together (a per-head q/k norm) or both be None.")
    R = cos_sin_PR.shape[-1]
    H = q_TNH.shape[-1]
    if R % 2 or R > H:
        raise ValueError(f"cos_sin_PR has {R} columns: the rotary dims must be even and at most head_dim={H}.")
    N = q_TNH.shape[1]
    if R == H and q_TNH.dtype == k_TKH.dtype and (q_norm_H is None or q_norm_H.dtype == k_norm_H.dtype
                                                  == q_TNH.dtype):
        # q and k as one [T, N + K, H] tensor: one norm and one rotation where there were two of each (a CPU
        # decode layer is op dispatch); each part takes its norm's weight after (the same products).
        qk_TXH = torch.cat([q_TNH, k_TKH], dim=1)
        if q_norm_H is not None:
            qk_TXH = rms_normalize(qk_TXH, eps)
            qk_TXH[:, :N].mul_(q_norm_H)
            qk_TXH[:, N:].mul_(k_norm_H)
        cos_T1H, sin_T1H = rotary_rows(positions_T, cos_sin_PR, qk_TXH.dtype)
        qk_TXH = _rotate(qk_TXH, cos_T1H, sin_T1H)
        reference_write_kv(qk_TXH[:, N:], v_TKH, k_cache_BLKH, v_cache_BLKH, slot_mapping_T, k_scale, v_scale)
        return qk_TXH[:, :N].contiguous()
    if q_norm_H is not None:
        q_TNH, k_TKH = reference_rms_norm(q_TNH, q_norm_H, eps), reference_rms_norm(k_TKH, k_norm_H, eps)
    q_rot, k_rot = reference_rotary(q_TNH[..., :R], k_TKH[..., :R], positions_T, cos_sin_PR)
    if R < H:
        q_rot, k_rot = torch.cat([q_rot, q_TNH[..., R:]], dim=-1), torch.cat([k_rot, k_TKH[..., R:]], dim=-1)
    reference_write_kv(k_rot.contiguous(), v_TKH.contiguous(), k_cache_BLKH, v_cache_BLKH, slot_mapping_T,
                       k_scale, v_scale)
    return q_rot.contiguous()

