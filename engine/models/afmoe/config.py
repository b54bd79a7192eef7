"""AFMoE's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # Trinity: per-expert gate/up/down under mlp.experts, the router at mlp.router.gate, its correction bias at
    # mlp.expert_bias, the shared MLP at mlp.shared_experts; self_attn.gate_proj the output gate (checkpoint kind
    # "afmoe": read into the gate rows of the q stack); input_layernorm / post_attention_layernorm around the
    # attention and pre_mlp_layernorm / post_mlp_layernorm around the FFN (residual kind "afmoe").
    Architecture("AfmoeForCausalLM",
                 ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, router="router.gate",
                          correction_bias="expert_bias", residual="afmoe", embedding="afmoe", head="afmoe",
                          checkpoint="afmoe"),
                 model_type="afmoe",
                 lora_refused="its attention gate_proj is read into the gate rows of the q stack (untested against "
                              "peft's adapters there)"),
)
