"""Nemotron-H's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

# Published names: backbone.embeddings, backbone.layers.{k}.norm / .mixer.*, backbone.norm_f, lm_head (transformers 5
# renames backbone. to model. in memory and writes backbone. back with save_pretrained); the routed experts per
# expert, mixer.experts.{e}.up_proj / down_proj (no gate), the router mixer.gate (+ e_score_correction_bias), the
# shared expert mixer.shared_experts.up_proj / down_proj, the latent projections mixer.fc1_latent_proj /
# fc2_latent_proj. The residual kind "nemotron_h" pairs a mixer layer with the FFN layer after it (kinds.py); the
# checkpoint kind "nemotron_h" names the embedding, the final norm and the prefix.
# Nemotron 3 Super's MTP layers (config.json's num_nextn_predict_layers, mtp_hybrid_override_pattern) sit under a
# top-level `mtp.` (vLLM's nemotron_h_mtp reads them there); transformers 5.24 builds none, nor does moelink: unread.
_SPEC = ArchSpec("gqa", moe_prefix="mixer", expert_names=PROJ, router="gate", residual="nemotron_h", ffn="nemotron_h",
                 checkpoint="nemotron_h", unread_prefixes=("mtp.",))

ARCHITECTURES = (
    Architecture("NemotronHForCausalLM", _SPEC, model_type="nemotron_h",
                 lora_refused="its checkpoint layers are paired into engine layers under other names",
                 mtp_refused="its MTP layers (mtp.*, a pattern of attention and MoE blocks of their own) are not built "
                             "yet."),
)
