"""Llama 4's registry entries (engine/config/architectures.py gathers them). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

# The published names (transformers' Llama4ForCausalLM): model.layers.{i}.self_attn.{q,k,v,o}_proj, and under
# feed_forward. either a dense MLP ({gate,up,down}_proj, intermediate_size_mlp wide: Maverick's dense layers; read
# through the dense kind's mlp. names, ArchSpec.weight_aliases) or the MoE block: router [E, D], experts.gate_up_proj
# [E, D, 2F] (x @ W: gate columns then up columns) and experts.down_proj [E, F, D], shared_expert.{gate,up,down}_proj
# (the FFN kind "llama4_moe", kinds.py).
SPEC = ArchSpec("gqa", moe_prefix="feed_forward", expert_names=PROJ, router="router", shared_experts="shared_expert",
                ffn="llama4_moe",
                weight_aliases=tuple((f"mlp.{n}.weight", f"feed_forward.{n}.weight") for n in PROJ))

# An adapter on q_proj / k_proj would miss the rows de-interleaved at load for the interleaved rope; the experts are
# stored fused and transposed.
_LORA = "its q/k rows are reordered at load (interleaved rope) and its experts are stored fused"

ARCHITECTURES = (
    Architecture("Llama4ForCausalLM", SPEC, model_type="llama4_text", rope_types=("llama3",), lora_refused=_LORA),
)

# The published checkpoints are multimodal (Llama4ForConditionalGeneration, model_type llama4): the text model under
# language_model.model., its head at language_model.lm_head, the vision tower (vision_model.) and its projector
# (multi_modal_projector.) not read; a request with an image is refused (images are a separate issue).
TEXT_MODELS = {"Llama4ForConditionalGeneration": ("Llama4ForCausalLM", "language_model.model.")}

# The published files' text_config writes attn_temperature_tuning 4 (a number, true as transformers 4's model read it),
# which transformers 5.24's strict Llama4TextConfig refuses (a bool field): the family reads model_type llama4_text
# itself, as a bool, then through transformers' class (reader.read_config).
OWN_CONFIGS = {"llama4_text": "reader"}
