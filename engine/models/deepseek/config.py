"""The DeepSeek-V3 family's registry entries (engine/config/architectures.py gathers them). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # DeepSeek-V3/R1, Kimi K2, Mistral Large 3 (DeepSeek-V3 format); DeepSeek-V2 / V2-Lite.
    Architecture("DeepseekV3ForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ), model_type="deepseek_v3",
                 mtp_layers=True),
    Architecture("DeepseekV2ForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ), model_type="deepseek_v2"),
    # DeepSeek Sparse Attention (engine/models/dsa_config.py): DeepSeek-V3.2 and GLM-5 (GLM-MoE-DSA) are MLA with a
    # lightning indexer per layer (GLM-5's "shared" layers reuse the previous one's selection) and DeepSeek-V3's MoE.
    Architecture("DeepseekV32ForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ),
                 model_type="deepseek_v32", mtp_layers=True),
    Architecture("GlmMoeDsaForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ),
                 model_type="glm_moe_dsa", mtp_layers=True),
    # GLM-4.5 / 4.6: GQA with partial rotary and the DeepSeek-V3 MoE block.
    Architecture("Glm4MoeForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ), model_type="glm4_moe",
                 mtp_layers=True),
    # GLM-4.7-Flash (glm4_moe_lite): DeepSeek-V3's MLA (q LoRA, interleaved rope) with GLM-4.5's MoE block (the
    # DeepSeek-V3 router), dense layers by mlp_layer_types; its MTP layer in DeepSeek-V3's layout.
    Architecture("Glm4MoeLiteForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ),
                 model_type="glm4_moe_lite", mtp_layers=True),
    # Sarvam-105B (sarvam_mla): DeepSeek-V3 as transformers 5.24 runs it (DeepseekV3ForCausalLM on a SarvamMLAConfig,
    # which reads the release's num_experts / num_shared_experts and its deepseek_yarn rope), DeepSeek-V3's names; its
    # num_mtp_layers' modules are in no release and are not read.
    Architecture("SarvamMLAForCausalLM", ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ), model_type="sarvam_mla"),
)
# Sparse attention (a lightning indexer beside MLA): the architectures whose reader builds MLAConfig.indexer.
DSA_ARCHITECTURES = ("DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM")
# Kimi K2 / K2 Thinking, and the text model of Kimi K2.5 (`kimi_k25`'s text_config), are DeepSeek-V3.
MODEL_TYPE_ALIASES = {"kimi_k2": "deepseek_v3"}
# Kimi K2.5 (transformers' kimi_k25 conversion mapping: `language_model.model` -> `model.language_model`,
# `language_model.lm_head` -> `lm_head`): the text model is `language_model.model.*`, its head
# `language_model.lm_head.weight` (checkpoint_headers.text_model_name maps both), beside `vision_tower.*` and
# `mm_projector.*`.
TEXT_MODELS = {"KimiK25ForConditionalGeneration": ("DeepseekV3ForCausalLM", "language_model.model."),
               # transformers' own form (its save_pretrained with save_original_format=False): the text model under
               # model.language_model., the head lm_head, MoonViT and its projector under model.vision_tower. and
               # model.mm_projector. (engine/multimodal/ reads them).
               "Kimi_K25ForConditionalGeneration": ("DeepseekV3ForCausalLM", "model.language_model.")}
