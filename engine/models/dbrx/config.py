"""DBRX's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # dbrx-base / dbrx-instruct: transformer.wte, transformer.blocks.{i}.norm_attn_norm.{norm_1, attn.Wqkv,
    # attn.out_proj, norm_2}, transformer.blocks.{i}.ffn.{router.layer, experts.mlp.w1 / v1 / w2}, transformer.norm_f,
    # lm_head: named by the residual kind "dbrx" (kinds.py) and its head kind; its norms are LayerNorms without bias.
    Architecture("DbrxForCausalLM", ArchSpec("gqa", moe_prefix="ffn", expert_names=PROJ, router="router",
                                             residual="dbrx", ffn="dbrx", head="dbrx", checkpoint="dbrx"),
                 model_type="dbrx", lora_refused="its fused Wqkv and w1 / v1 / w2 experts are no adapter targets"),
)
