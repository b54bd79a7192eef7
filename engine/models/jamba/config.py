"""Jamba's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

# As published (and as transformers 5.24 saves it): the layer's FFN under feed_forward: routed layers
# feed_forward.router.weight and per-expert feed_forward.experts.{e}.gate_proj / up_proj / down_proj, dense layers
# feed_forward.gate_proj / up_proj / down_proj (read through the aliases in place of the shared blocks' mlp.*); the
# norms input_layernorm and pre_ff_layernorm (the prenorm layer's post_attention_layernorm), the final norm
# model.final_layernorm; attention at self_attn, Mamba1 at mamba.
SPEC = ArchSpec("gqa", moe_prefix="feed_forward", expert_names=PROJ, router="router", weight_aliases=(
    ("mlp.gate_proj.weight", "feed_forward.gate_proj.weight"),
    ("mlp.up_proj.weight", "feed_forward.up_proj.weight"),
    ("mlp.down_proj.weight", "feed_forward.down_proj.weight"),
    ("post_attention_layernorm.weight", "pre_ff_layernorm.weight"),
    ("model.norm.weight", "model.final_layernorm.weight"),
))

ARCHITECTURES = (
    Architecture("JambaForCausalLM", SPEC, model_type="jamba",
                 lora_refused="its Mamba1 layers and feed_forward names are untested with adapters against peft"),
)
