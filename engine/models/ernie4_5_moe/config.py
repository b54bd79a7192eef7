"""ERNIE-4.5-MoE's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # ERNIE-4.5-21B-A3B / -300B-A47B: per-expert gate/up/down under mlp.experts, the shared MLP at mlp.shared_experts,
    # the router at mlp.gate (float32 as published) and its correction bias [1, E] at mlp.moe_statics (transformers 5's
    # own names keep it under the router: mlp.gate.moe_statics). The published files' next-token-prediction layers
    # (model.mtp_*) are not read: transformers ignores them too.
    Architecture("Ernie4_5_MoeForCausalLM",
                 ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ,
                          correction_bias="moe_statics.e_score_correction_bias", checkpoint="ernie4_5_moe",
                          weight_aliases=(("mlp.moe_statics.e_score_correction_bias",
                                           "mlp.gate.moe_statics.e_score_correction_bias"),),
                          unread_prefixes=("model.mtp_",)),
                 model_type="ernie4_5_moe",
                 # Its q/k rows are de-interleaved at load (gqa.rope_rows): untested against peft's adapters there.
                 lora_refused="its q/k rows are reordered at load (the interleaved rope)"),
)
