"""Qwen3.8-Flash-Next's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # Qwen3.8-Flash-Next's text model (reader.py): gated DeltaNet and QSA layers, gated hyper-connections, PLE
    # tables, Qwen3-Next's MoE block; published inside Qwen4ExpForConditionalGeneration checkpoints (TEXT_MODELS).
    # Its block kinds are this package's (kinds.py); the MTP layers (mtp.*) are not read.
    Architecture("Qwen4ExpForCausalLM", ArchSpec("qsa", moe_prefix="mlp", expert_names=PROJ,
                                                 shared_experts="shared_expert", residual="gated_hyper",
                                                 embedding="hc_streams", head="hc_mixer",
                                                 unread_prefixes=("mtp.",)),
                 model_type="qwen4_exp_text"),
)
# The multimodal wrapper whose text model this is, and where its "model." tensors live (images: not served).
TEXT_MODELS = {"Qwen4ExpForConditionalGeneration": ("Qwen4ExpForCausalLM", "model.language_model.")}
