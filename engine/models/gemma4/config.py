"""Gemma 4's registry entries (engine/config/architectures.py gathers them). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

# transformers' Gemma4ForCausalLM names, per layer i under model.layers.{i}.: self_attn.{q,k,v,o}_proj (no v_proj on
# a full-attention layer under attention_k_eq_v), self_attn.{q,k}_norm; input_layernorm, post_attention_layernorm,
# pre_feedforward_layernorm, post_feedforward_layernorm, layer_scalar [1]; the dense MLP mlp.{gate,up,down}_proj; with
# enable_moe_block the router (router.proj [E, D], router.scale [D], router.per_expert_scale [E]), the fused experts
# (experts.gate_up_proj [E, 2F, D]: gate rows then up rows, moelink's w13; experts.down_proj [E, D, F], its w2) and
# their norms pre_feedforward_layernorm_2, post_feedforward_layernorm_1 / _2 (the kinds: kinds.py). The head is tied.
SPEC = ArchSpec("gqa", moe_prefix="", expert_names=PROJ, router="router.proj", residual="gemma4", ffn="gemma4_moe",
                embedding="gemma4", head="gemma4")

# The norms around every block, the per-layer scalar and the router's scales are the family's own modules; an adapter
# is not tested against peft for them (nor for k_proj read as the values too).
_LORA = "its attention and MoE blocks are its own kinds (sandwich norms, k_proj read as the values), untested with peft"

ARCHITECTURES = (
    Architecture("Gemma4ForCausalLM", SPEC, model_type="gemma4_text", rope_types=("proportional",),
                 lora_refused=_LORA),
)

# The published checkpoints are multimodal (Gemma4ForConditionalGeneration, model_type gemma4): the text model under
# model.language_model., the head tied to its embedding, the vision and audio towers (model.vision_tower.,
# model.audio_tower., their embedders) not read; a request with an image is refused.
TEXT_MODELS = {"Gemma4ForConditionalGeneration": ("Gemma4ForCausalLM", "model.language_model.")}
