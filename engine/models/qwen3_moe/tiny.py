"""Qwen3-MoE's tiny checkpoint: `moelink make-tiny-model --arch qwen3_moe`, written and sized by make_tiny_model
itself (engine/tools/tiny_model.py)."""
from __future__ import annotations

from ...tools.tiny_families import QUANT_FORMATS, TinyArch

ARCHS = {
    "qwen3_moe": TinyArch("Qwen3MoeForCausalLM", "Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder MoE",
                          ("float",) + QUANT_FORMATS, sized="qwen3_moe"),
}

__all__ = ["ARCHS"]
