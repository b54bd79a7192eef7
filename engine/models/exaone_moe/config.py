"""EXAONE-MoE's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

# K-EXAONE (LGAI-EXAONE/K-EXAONE-236B-A23B): per-expert gate/up/down under mlp.experts, the shared expert under
# mlp.shared_experts, the router at mlp.gate and its correction bias beside it at mlp.e_score_correction_bias
# (the published name; transformers 5's own, save_original_format=False, keeps it under the router).
SPEC = ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, correction_bias="e_score_correction_bias",
                weight_aliases=(("mlp.e_score_correction_bias", "mlp.gate.e_score_correction_bias"),))

ARCHITECTURES = (
    Architecture("ExaoneMoeForCausalLM", SPEC, model_type="exaone_moe"),
    # vLLM's spelling of the same architecture (its registry keys K-EXAONE as ExaoneMoEForCausalLM): the same
    # checkpoint, config.json and names.
    Architecture("ExaoneMoEForCausalLM", SPEC, model_type="exaone_moe", alias_of="ExaoneMoeForCausalLM"),
)
