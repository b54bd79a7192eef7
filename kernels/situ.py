"""SiTU, Kimi K3's gated activation, as a `MoEActivation` (kernels/moe.py) so that the experts, the shared experts
and the dense MLPs take it wherever they take an activation: act(gate, up) = beta tanh(gate / beta) sigmoid(gate) *
lb tanh(up / lb), with config.json's activation_situ_beta (beta) and activation_situ_linear_beta (lb; null: up as it
is), computed in float32 (or wider) and cast back once, as vLLM's, SGLang's and mlx-lm's SituAndMul do.

Reference only: the Triton fused MoE (kernels/triton_moe.py) has no SiTU epilogue yet, so SiTU experts run the
plain-torch reference on every device (engine/models/kimi_k3/latent_moe.py); the dense and shared MLPs call it as
their activation. Its own kind, not one of MoEActivation's, because kernels/moe.py validates its kinds (a change
there is asked of its owner: docs/models.md, Kimi K3).

Legend: T tokens, I intermediate size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .moe import MoEActivation


@dataclass(frozen=True)
class SiTU(MoEActivation):
    """beta tanh(gate / beta) sigmoid(gate) * linear_beta tanh(up / linear_beta) (module docstring)."""

    kind: str = "situ"
    beta: float = 1.0
    linear_beta: float | None = None

    def __post_init__(self) -> None:
        for name in ("beta", "linear_beta"):
            v = getattr(self, name)
            if v is None and name == "linear_beta":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
                raise ValueError(f"config.json activation_situ_{name}={v!r} is invalid: must be a finite number > 0"
                                 + (" or null." if name == "linear_beta" else "."))

    def __call__(self, gate_TI: torch.Tensor, up_TI: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(gate_TI.dtype, torch.float32)
        gate, up = gate_TI.to(wide), up_TI.to(wide)
        a = self.beta * torch.tanh(gate / self.beta) * torch.sigmoid(gate)
        if self.linear_beta is not None:
            up = self.linear_beta * torch.tanh(up / self.linear_beta)
        return (a * up).to(gate_TI.dtype)


__all__ = ["SiTU"]
