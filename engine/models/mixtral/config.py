"""Mixtral's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import ArchSpec, Architecture

ARCHITECTURES = (
    Architecture("MixtralForCausalLM", ArchSpec("gqa", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2")),
                 model_type="mixtral"),
)
