"""FP8 experts' input quantized by the norm before them (issue 80's FP8 decode row).

W8A8 FP8 experts quantize x per token and Bk channels before their gate-up GEMM; on a GPU that is a launch of its
own, and at decode sizes each launch in the step costs about as much as the bytes it saves. The norm that makes x
(the post-attention RMSNorm of a prenorm layer) can write the quantized copy in its own launch instead
(kernels.add_rms_norm_fp8): the layer asks the MoE layer whether it wants it (`wants`), hands it over beside x
(`hand`), and the experts take it (`take`) only when the tensor they run on is that very x: under tensor or expert
parallelism the experts run on sliced or dispatched rows, not on x, and quantize those themselves as before. The
router still reads x in its own dtype.

Legend: T tokens, D hidden, G = ceil(D / group) scale groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Fp8Input:
    """The handoff, one per FP8 MoE layer where the kernels fuse the quantization into the norm (Triton on CUDA;
    moe/layer.py makes it). `group`: the experts' Bk; `max_tokens`: the largest batch it is used for (data: None
    is every size: the fused copy moves fewer bytes than a quantization launch at any size)."""

    group: int
    max_tokens: int | None = None
    _held: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def wants(self, num_tokens: int) -> bool:
        """Whether the norm should quantize a batch of `num_tokens` rows for these experts."""
        return num_tokens > 0 and (self.max_tokens is None or num_tokens <= self.max_tokens)

    def hand(self, x_TD: torch.Tensor, xq_TD: torch.Tensor, xs_TG: torch.Tensor) -> None:
        """x and its quantized copy (xq e4m3 [T, D], xs float32 [T, G]), for the experts' next run."""
        self._held = (x_TD, xq_TD, xs_TG)

    def take(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(xq, xs) when the experts run on the very x handed over, else None (they quantize x themselves); the
        handoff is cleared either way, so a later run never reads a stale copy."""
        held, self._held = self._held, None
        if held is None or held[0] is not x_TD:
            return None
        return held[1], held[2]
