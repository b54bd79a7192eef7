"""The decode attention input and output in one launch each, as a strategy a GQA layer holds (`FusedInput`):
where it takes a step, the layer's input norm (with the residual add), its q/k/v projection and its q/k norm +
rotary + KV write run as kernels.norm_qkv_rope_kv (kernels/triton_qkv_rope_kv.py) instead of a norm launch, a GEMM
and rope_write_kv; and where `takes_output` too, o_proj, the residual add and the norm before the FFN block run as
kernels.linear_add_rms_norm (kernels/triton_linear_norm.py) instead of a GEMM and a norm launch.

Why: a batch-1 decode layer's attention half was eight dependent launches for ~9.5 us of bytes on an H200
(docs/gpu-session-steps.md, issue 80's first row); these remove three of them (the input norm, the q/k norm +
rotary + KV write, the norm after) and the projections' outputs' round trips through DRAM.

Which layers: plain GQA (not a kind that attends its own way), NeoX rotary on every head, a q/k/v stack without
gaps, float or FP8 block-scaled in blocks the GEMV takes (fused_output.gemv_weight), no output gate, no all-heads
q/k norm, no value scale, no q/k/v clamp, no q/k norm after the rotary, and head widths a block of 8-64 rows divides; the Triton kernels only (the CPU path's native norm and linear are already one call each). Which steps:
up to kernels.triton_qkv_rope_kv.MAX_TOKENS tokens, and no LoRA adapter on the projection (its hook runs after
the matmul). The decision is a function of the layer and the step's token count, known on the host: a CUDA graph
captured for a batch size always replays the same path.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from moelink.kernels.attention_input import MAX_TOKENS, block_rows

from .fused_output import FUSED_DTYPES, FusedOutput, gemv_weight
from .linear import Linear



class GQALayer(Protocol):
    """What the strategy reads of its layer (engine/models/gqa.py's GQAAttention)."""

    kernels: Any
    rope: Any
    qkv_proj: Linear
    o_proj: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    v_head_dim: int
    rotary: bool
    output_gate: bool
    all_heads_norm: bool
    value_scale: float
    clip_qkv: float | None
    norm_after_rope: bool


class FusedInput:
    """One layer's fused attention input and output (the mixer's `fusion`, engine/models/fused_output.py: the seam):
    the input launch's head-group counters (kernels/triton_qkv_rope_kv.group_counters, zeros the launch leaves
    zero), the output launch's strategy (`output`) and the per-step tests."""

    def __init__(self, attn: GQALayer, device) -> None:
        self.attn = attn
        self.counters_G = torch.zeros(attn.num_heads + attn.num_kv_heads, dtype=torch.int32, device=device)
        self.output = FusedOutput(attn.o_proj, device)

    @staticmethod
    def for_layer(attn: GQALayer, hidden_size: int, device, plain: bool) -> FusedInput | None:
        """The strategy when the layer's shape and kernels allow it (the module docstring), else None. plain: the
        layer attends and projects as GQAAttention does (no subclass overrides `forward` or `_attend`)."""
        proj = attn.qkv_proj
        takes = (attn.kernels.name == "triton" and plain and attn.rope.style == "neox" and attn.rotary
                 and not attn.output_gate and not attn.all_heads_norm and attn.value_scale == 1.0
                 and attn.clip_qkv is None and not attn.norm_after_rope
                 and proj.in_features == hidden_size and proj.rows == proj.out_features
                 and block_rows(attn.head_dim, attn.v_head_dim) is not None)
        return FusedInput(attn, device) if takes else None

    def takes(self, x_TD: torch.Tensor) -> bool:
        """Whether this step's attention input runs fused (host-side facts only: no sync)."""
        proj = self.attn.qkv_proj
        return (0 < x_TD.shape[0] <= MAX_TOKENS and proj.lora is None and self.weight() is not None
                and x_TD.dtype in FUSED_DTYPES and self.counters_G.device == x_TD.device)

    def weight(self) -> dict[str, Any] | None:
        """The q/k/v weight's keywords for kernels.norm_qkv_rope_kv (fused_output.gemv_weight), None: not taken."""
        attn = self.attn
        return gemv_weight(attn.qkv_proj, block_rows(attn.head_dim, attn.v_head_dim) or 0)

    def takes_output(self, x_TD: torch.Tensor) -> bool:
        """Whether o_proj, the residual add and the next norm run as one launch too (kernels.linear_add_rms_norm):
        FusedOutput's test (an o_proj the GEMV takes, without a LoRA adapter, whole on this rank)."""
        return self.output.takes_output(x_TD)
