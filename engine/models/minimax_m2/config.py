"""MiniMax-M2's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import ArchSpec, Architecture

ARCHITECTURES = (
    # MiniMax-M2 / M2.1: GQA with q/k RMSNorm over all heads and partial rotary; sigmoid routing with a correction
    # bias beside the router, experts named as Mixtral's.
    Architecture("MiniMaxM2ForCausalLM", ArchSpec("gqa", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"),
                                                  correction_bias="e_score_correction_bias"), model_type="minimax_m2"),
)
