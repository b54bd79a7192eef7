"""HunYuan-MoE-V1's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # Hunyuan-A13B: per-expert gate/up/down under mlp.experts, the router at mlp.gate.wg, one ungated shared MLP at
    # mlp.shared_mlp, the q/k norms at self_attn.query_layernorm / key_layernorm (transformers' names; the engine's
    # plan names q_norm / k_norm and mlp.gate, read under these: ArchSpec.weight_aliases). Its rope is published as
    # rope_type "dynamic" with a fixed alpha (transformers' ntk_alpha: a larger base, no length dependence).
    Architecture("HunYuanMoEV1ForCausalLM",
                 ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, shared_experts="shared_mlp",
                          weight_aliases=(("self_attn.q_norm.weight", "self_attn.query_layernorm.weight"),
                                          ("self_attn.k_norm.weight", "self_attn.key_layernorm.weight"),
                                          ("mlp.gate.weight", "mlp.gate.wg.weight"))),
                 model_type="hunyuan_v1_moe", rope_types=("dynamic",)),
)
