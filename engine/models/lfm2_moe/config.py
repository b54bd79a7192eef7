"""LFM2-MoE's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import ArchSpec, Architecture

# Published names, under model.layers.{i}.: operator_norm / ffn_norm (the prenorm layer's two norms), conv.in_proj /
# conv.conv / conv.out_proj (the short conv), self_attn.{q,k,v}_proj / out_proj / q_layernorm / k_layernorm,
# feed_forward.w1 / w3 / w2 (the dense MLPs), feed_forward.gate (the router), feed_forward.expert_bias,
# feed_forward.experts.{e}.w1 / w3 / w2 (or transformers 5's fused experts.gate_up_proj / down_proj); the final norm
# at model.embedding_norm. The checkpoint kind "lfm2_moe" maps the blocks' plans onto them (kinds.py).
_SPEC = ArchSpec("gqa", moe_prefix="feed_forward", expert_names=("w1", "w3", "w2"), router="gate",
                 correction_bias="expert_bias", ffn="lfm2_moe", checkpoint="lfm2_moe")

ARCHITECTURES = (
    Architecture("Lfm2MoeForCausalLM", _SPEC, model_type="lfm2_moe",
                 lora_refused="its short-conv layers and LFM2's tensor names are no adapter targets yet"),
)
