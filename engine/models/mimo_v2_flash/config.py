"""MiMo-V2-Flash's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from dataclasses import replace

from ...config.arch_spec import PROJ, ArchSpec, Architecture

SPEC = ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, sinks="attention_sink_bias",
                unread_prefixes=("model.mtp.",), weight_aliases=(("self_attn.attention_sink_bias", "self_attn.sinks"),))
SPEC_FUSED_QKV = replace(SPEC, checkpoint="mimo_v2_fused_qkv")

ARCHITECTURES = (
    # MiMo-V2-Flash: full and sliding-window GQA layers with kv heads, sinks and rope of their own (per-layer
    # attention configs), values narrower than q/k; DeepSeek-V3 routing without shared experts; its MTP layers
    # (model.mtp.*, a layout of their own) are not read.
    Architecture("MiMoV2FlashForCausalLM", SPEC, model_type="mimo_v2_flash"),
    # The same model as vLLM registers MiMo-V2 (MiMoV2ForCausalLM): each layer's q, k and v projections fused into
    # self_attn.qkv_proj (rows q, then k, then v; the biases likewise), split at load by the layer's own head counts
    # (the checkpoint kind "mimo_v2_fused_qkv": kinds.py). Everything else as MiMo-V2-Flash's.
    Architecture("MiMoV2ForCausalLM", SPEC_FUSED_QKV, model_type="mimo_v2_flash", alias_of="MiMoV2FlashForCausalLM",
                 lora_refused="its q, k and v are read from the fused self_attn.qkv_proj, where an adapter's q_proj / "
                              "k_proj / v_proj find no target of their own (untested against peft)"),
)
