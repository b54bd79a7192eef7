"""MiMo-V2-Flash's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # MiMo-V2-Flash: full and sliding-window GQA layers with kv heads, sinks and rope of their own (per-layer
    # attention configs), values narrower than q/k; DeepSeek-V3 routing without shared experts; its MTP layers
    # (model.mtp.*, a layout of their own) are not read.
    Architecture("MiMoV2FlashForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ,
                                                    sinks="attention_sink_bias", unread_prefixes=("model.mtp.",),
                                                    weight_aliases=(("self_attn.attention_sink_bias",
                                                                     "self_attn.sinks"),)),
                 model_type="mimo_v2_flash"),
)
