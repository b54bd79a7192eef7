"""Sarvam-MoE's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # sarvam-30b as published: the embedding at model.word_embeddings, attention under `attention` with q/k/v fused in
    # query_key_value (rows q, k, v), o_proj at attention.dense, the q/k norms at query_layernorm / key_layernorm, the
    # correction bias at mlp.gate.expert_bias (checkpoint kind "sarvam_moe": kinds.py); per-expert gate/up/down under
    # mlp.experts and the shared MLP at mlp.shared_experts, as DeepSeek-V3's. A file in transformers 5's own names
    # reads as it is. transformers runs it as Glm4MoeForCausalLM (its model_type sarvam_moe).
    Architecture("SarvamMoEForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, checkpoint="sarvam_moe"),
                 model_type="sarvam_moe",
                 lora_refused="its q, k and v are read from the fused attention.query_key_value, where an adapter's "
                              "q_proj / k_proj / v_proj find no target of their own (untested against peft)"),
)
