"""A plain-torch offline writer of GPTQ and AWQ INT4 checkpoints by round-to-nearest, the oracle of
tests/engine/test_weight_updates_gptq_awq.py (independent of engine/rl/requantize_gptq_awq.py: written from the
libraries' own rules, group by group and nibble by nibble).

GPTQ (AutoGPTQ `Quantizer.find_params`, then `QuantLinear.pack`): per group of G input channels, xmin = min(min w, 0),
xmax = max(max w, 0); symmetric: xmax = max(|xmin|, xmax), xmin = -xmax if xmin < 0, zero 8; an all-zero range is
[-1, 1]; scale = (xmax - xmin) / 15; asymmetric zero = round(-xmin / scale); q = clamp(round(w / scale) + zero, 0, 15).
qweight [K/8, N]: bits 4j of word r hold input channel 8r + j; qzeros [K/G, N/8] (stored zero - 1: checkpoint_format
"gptq"; a zero of 0 has no such code and is raised to 1) hold output channel 8c + j at bits 4j; scales float16
[K/G, N]; g_idx [K] = k // G.
AWQ (AutoAWQ `pseudo_quantize_tensor`, then `WQLinear_GEMM.from_linear`): scale = max(max w - min w, 1e-5) / 15,
zero = clamp(-round(min w / scale), 0, 15); qweight [K, N/8] and qzeros [K/G, N/8] hold output channel
8c + [0, 2, 4, 6, 1, 3, 5, 7][j] at bits 4j; scales float16 [K/G, N]. Integers from the float32 scale."""
from __future__ import annotations

from pathlib import Path

import torch

from moelink.engine.tools.tiny_formats import EXPERT, LINEAR, rewrite_checkpoint

_AWQ_SLOTS = [0, 2, 4, 6, 1, 3, 5, 7]


def _params(g: torch.Tensor, layout: str, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of groups g [rows, G] (float32), as the library computes them."""
    if layout == "awq":
        hi, lo = g.amax(dim=1), g.amin(dim=1)
        scale = (hi - lo).clamp(min=1e-5) / 15
        return scale, (-torch.round(lo / scale)).clamp(0, 15)
    zero_t = torch.zeros(g.shape[0])
    xmin, xmax = torch.minimum(g.min(1)[0], zero_t), torch.maximum(g.max(1)[0], zero_t)
    if symmetric:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        neg = xmin < 0
        xmin[neg] = -xmax[neg]
    both = (xmin == 0) & (xmax == 0)
    xmin[both], xmax[both] = -1.0, 1.0
    scale = (xmax - xmin) / 15
    if symmetric:
        return scale, torch.full_like(scale, 8.0)
    zero = torch.round(-xmin / scale)
    zero[zero == 0] = 1.0  # v1's stored zero - 1 has no code for 0 (AutoGPTQ would spill -1 into the next columns)
    return scale, zero


def _int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def rtn_quantize(w: torch.Tensor, layout: str, symmetric: bool, group: int) -> dict[str, torch.Tensor]:
    """One [N, K] float weight -> its GPTQ ("gptq", v1 zeros) or AWQ ("awq") tensors."""
    n, k = w.shape
    q_NK = torch.empty(n, k, dtype=torch.int64)
    z_NS = torch.empty(n, k // group, dtype=torch.int64)
    s_NS = torch.empty(n, k // group, dtype=torch.float32)
    for i in range(k // group):
        g = w[:, i * group:(i + 1) * group].to(torch.float32)
        scale, zero = _params(g, layout, symmetric)
        q_NK[:, i * group:(i + 1) * group] = torch.clamp(torch.round(g / scale[:, None]) + zero[:, None], 0, 15).long()
        z_NS[:, i], s_NS[:, i] = zero.long(), scale
    out = {"scales": s_NS.T.contiguous().to(torch.float16)}
    if layout == "gptq":
        qw = torch.zeros(k // 8, n, dtype=torch.int64)
        for j in range(8):
            qw |= q_NK[:, j::8].T << (4 * j)
        zeros = z_NS.T - 1
        slots = list(range(8))
        out["g_idx"] = torch.tensor([c // group for c in range(k)], dtype=torch.int32)
    else:
        qw = torch.zeros(k, n // 8, dtype=torch.int64)
        for j, col in enumerate(_AWQ_SLOTS):
            qw |= q_NK[col::8, :].T << (4 * j)
        zeros, slots = z_NS.T, _AWQ_SLOTS
    qz = torch.zeros(k // group, n // 8, dtype=torch.int64)
    for j, col in enumerate(slots):
        qz |= zeros[:, col::8] << (4 * j)
    out["qweight"], out["qzeros"] = _int32(qw), _int32(qz)
    return out


def rtn_checkpoint(src: str, out: Path, layout: str, symmetric: bool = True, group: int = 32,
                   scope: str = "experts") -> str:
    """Float checkpoint `src` with its routed experts (scope "experts") or every projection ("all": attention, dense
    and shared MLPs too, as GPTQ / AWQ releases quantize them; the router and lm_head stay float) written in GPTQ's or
    AWQ's layout by rtn_quantize."""
    def tensors(ts: dict) -> dict:
        new = {}
        for name, t in ts.items():
            if EXPERT.search(name) or (scope == "all" and LINEAR.search(name)):
                base = name[: -len("weight")]
                new.update({base + p: v for p, v in rtn_quantize(t, layout, symmetric, group).items()})
            else:
                new[name] = t
        return new

    def config(c: dict) -> dict:
        c["quantization_config"] = (
            {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": symmetric,
             "checkpoint_format": "gptq"} if layout == "gptq" else
            {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"})
        return c

    return rewrite_checkpoint(Path(src), Path(out), tensors, config)
