"""A trainer's float weight re-quantized into a served GPTQ or AWQ INT4 layout (engine/rl/requantize.py; docs/rl.md).

Round-to-nearest per served group with each format's own scale / zero conventions, not GPTQ's Hessian-based error
feedback nor AWQ's activation-aware scale search: both need calibration activations and a pass over each layer
with them, while a trainer's update must land in the time of a copy, bucket by bucket, on every rank's own
shard. What the integers mean is what the served checkpoint's kernels read, so the engine serves exactly the RTN
weights below (a deployment loaded from a checkpoint written offline by the same rules gives the same tokens).

- GPTQ (AutoGPTQ / GPTQModel's `Quantizer.find_params` over each group of `group` input channels): the range takes
  zero in (xmin = min(w, 0), xmax = max(w, 0)); symmetric: xmax = max(|xmin|, xmax), xmin = -xmax where xmin < 0,
  zero point (maxq + 1) / 2 = 8; asymmetric: zero = round(-xmin / scale); an all-zero group takes [-1, 1];
  scale = (xmax - xmin) / 15; q = clamp(round(w / scale) + zero, 0, 15). Stored: `qweight` int32 [K/8, N] (8
  consecutive K values a word, the lowest bits first), `qzeros` int32 [K/G, N/8] packed along N (zero - 1 in the v1
  `checkpoint_format: gptq`, as AutoGPTQ writes; a zero of 0, a group with no negative value, has no v1 code: AutoGPTQ
  writes -1 into the word and spills into the next columns, so here it is raised to 1 and the integers computed with
  it), `scales` [K/G, N] in the served dtype; `g_idx` (k // G: the loader refuses `desc_act`) keeps its served value.
- AWQ (AutoAWQ's `pseudo_quantize_tensor`, zero points, GEMM packing): scale = max(wmax - wmin, 1e-5) / 15 over the
  group's own min / max, zero = clamp(-round(wmin / scale), 0, 15), q = clamp(round(w / scale) + zero, 0, 15).
  Stored: `qweight` int32 [K, N/8] and `qzeros` int32 [K/G, N/8], both packed along N in AWQ's order (slot j of a
  word holds column 8w + [0, 2, 4, 6, 1, 3, 5, 7][j]), `scales` [K/G, N] in the served dtype.

The integers are computed in float32 from the float32 scale (the libraries compute them from the scale before it is
stored in float16); the scale is then stored in the served dtype, as they store it.
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _groups(w: torch.Tensor, group: int) -> torch.Tensor:
    """[N, K] float -> float32 [N, K/G, G]; one ValueError when K is not a multiple of the group."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"INT4 group {group}: a weight of shape {(n, k)} has K={k}, not a multiple of the group.")
    if n % 8:
        raise ValueError(f"a weight of shape {(n, k)} has N={n}, not a multiple of 8 (the zero points pack 8 output "
                         "channels a word).")
    return w.to(torch.float32).reshape(n, k // group, group)


def _word(v: torch.Tensor) -> torch.Tensor:
    """[..., 8] nibbles (int64) -> int32 words, slot j at bits 4j (two's complement, as the formats store them)."""
    word = (v << (4 * torch.arange(8, dtype=torch.int64))).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _pack_n(u_KN: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    k, n = u_KN.shape
    return _word(u_KN.to(torch.int64).reshape(k, n // 8, 8)[:, :, list(order)])


def gptq_quantize(w: torch.Tensor, group: int, symmetric: bool, v1: bool, scale_dtype: torch.dtype) -> dict:
    """[N, K] float -> {"qweight", "qzeros", "scales"} in GPTQ's layout (module docstring)."""
    g = _groups(w, group)
    xmin = torch.clamp(g.amin(-1), max=0.0)
    xmax = torch.clamp(g.amax(-1), min=0.0)
    if symmetric:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = torch.where(empty, -1.0, xmin), torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / 15
    zero = torch.full_like(scale, 8.0) if symmetric else torch.round(-xmin / scale)
    if v1:  # v1 stores zero - 1 in a nibble: a zero of 0 (a group with no negative value) has no code, so it is 1
        zero = torch.clamp(zero, min=1.0)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15).to(torch.int64)
    n, k = w.shape
    q_KN = q.reshape(n, k).T
    return {"qweight": _word(q_KN.reshape(k // 8, 8, n).transpose(1, 2)),
            "qzeros": _pack_n((zero.to(torch.int64) - (1 if v1 else 0)).T),
            "scales": scale.T.contiguous().to(scale_dtype)}


def awq_quantize(w: torch.Tensor, group: int, scale_dtype: torch.dtype) -> dict:
    """[N, K] float -> {"qweight", "qzeros", "scales"} in AWQ's GEMM layout (module docstring)."""
    g = _groups(w, group)
    wmax, wmin = g.amax(-1), g.amin(-1)
    scale = torch.clamp(wmax - wmin, min=1e-5) / 15
    zero = torch.clamp(-torch.round(wmin / scale), 0, 15)
    q = torch.clamp(torch.round(g / scale[..., None]) + zero[..., None], 0, 15).to(torch.int64)
    n, k = w.shape
    return {"qweight": _pack_n(q.reshape(n, k).T, AWQ_ORDER), "qzeros": _pack_n(zero.to(torch.int64).T, AWQ_ORDER),
            "scales": scale.T.contiguous().to(scale_dtype)}


__all__ = ["AWQ_ORDER", "awq_quantize", "gptq_quantize"]
