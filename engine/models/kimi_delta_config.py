"""Kimi Delta Attention as a layer kind (Kimi Linear, Ling's hybrid, GLM-5.3-Flash's linear layers), read from
config.json: gated DeltaNet's per-sequence states and rule (gated_deltanet_config.py) with a decay per key channel;
its module is kimi_delta.py beside it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .gated_deltanet_config import LinearAttentionConfig


@dataclass(frozen=True)
class KimiDeltaConfig(LinearAttentionConfig):
    """Kimi Delta Attention (Kimi Linear): gated DeltaNet's states and rule with a decay per key channel, one q/k head
    per value head (num_k_heads = num_v_heads, head_k_dim = head_v_dim), q/k/v from three projections, a low-rank
    forget gate and output gate (engine/models/kimi_delta.py). The checkpoint names it `self_attn`, as a full layer."""

    kind: ClassVar[str] = "kda"
    projection: str = "split"
    # The forget gate's and the output gate's projections: "low_rank" through head_dim (Kimi Linear: f_a / f_b,
    # g_a / g_b) or "full" (Ling's hybrid: f_proj, g_proj).
    forget_gate: str = "low_rank"
    output_gate: str = "low_rank"
    # Ling's "safe gate": g = lower_bound * sigmoid(exp(A_log) * x), bounded in [lower_bound, 0]; None: Kimi's
    # g = -exp(A_log) * softplus(x). decay_in_model_dtype: the decay rounded to the activations' dtype (Ling's), as
    # transformers hands it to the rule.
    gate_lower_bound: float | None = None
    decay_in_model_dtype: bool = False
    # A_log held in float32 whatever the model's dtype (transformers keeps it so for GLM-5.3-Flash: its
    # _keep_in_fp32_modules_strict); False: in the model's dtype, as Kimi Linear's.
    a_log_float32: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_v_heads != self.num_k_heads or self.head_v_dim != self.head_k_dim:
            raise ValueError(f"KimiDeltaConfig has one q/k head per value head of the same width: {self.fields()}.")
        for name in ("forget_gate", "output_gate"):
            if getattr(self, name) not in ("low_rank", "full"):
                raise ValueError(f"KimiDeltaConfig {name}={getattr(self, name)!r} is invalid: 'low_rank' or 'full'.")
        b = self.gate_lower_bound
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b < 0):
            raise ValueError(f"config.json kda_lower_bound={b!r} is invalid: must be a number < 0.")

    def header_shapes(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {}  # its tensors sit under self_attn, read by the module's own plan

    def fields(self) -> str:
        return (f"linear_attn_config.num_heads={self.num_v_heads}, head_dim={self.head_k_dim}, "
                f"short_conv_kernel_size={self.conv_kernel}")


__all__ = ["KimiDeltaConfig"]
