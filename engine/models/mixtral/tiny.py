"""Mixtral's tiny checkpoint: `moelink make-tiny-model --arch mixtral`, written and sized by make_tiny_model itself
(engine/tools/tiny_model.py)."""
from __future__ import annotations

from ...tools.tiny_families import QUANT_FORMATS, TinyArch

ARCHS = {
    "mixtral": TinyArch("MixtralForCausalLM", "Mixtral-8x7B, Mixtral-8x22B", ("float",) + QUANT_FORMATS,
                        sized="mixtral"),
}

__all__ = ["ARCHS"]
