"""Flint's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # Flint: per-expert gate/up/down under mlp.experts, the float32 router at mlp.gate, the ungated shared expert at
    # mlp.shared_expert, q_norm / k_norm under self_attn and each head's sink published as self_attn.softmax_offset
    # (transformers 5's own name, self_attn.sinks, read where the file holds that).
    Architecture("FlintForCausalLM",
                 ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, shared_experts="shared_expert",
                          sinks="softmax_offset", weight_aliases=(("self_attn.softmax_offset", "self_attn.sinks"),)),
                 model_type="flint"),
)
