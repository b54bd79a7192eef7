"""Kimi Linear's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import ArchSpec, Architecture

ARCHITECTURES = (
    # Kimi-Linear-48B-A3B: the routed experts as published, Mixtral's names under block_sparse_moe (w1 / w3 / w2),
    # the shared expert and the router beside them; every attention layer (KDA or MLA) under self_attn. A dense
    # layer's MLP is `mlp.` as published; transformers 5.24 writes it under block_sparse_moe (its conversion renames
    # the one prefix to the other both ways), read there when the file has no `mlp.`.
    Architecture("KimiLinearForCausalLM",
                 ArchSpec("mla", moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"),
                          weight_aliases=tuple((f"mlp.{n}.weight", f"block_sparse_moe.{n}.weight")
                                               for n in ("gate_proj", "up_proj", "down_proj"))),
                 model_type="kimi_linear"),
)
