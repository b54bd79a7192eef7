"""Hunyuan Hy4's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

# What save_pretrained writes (transformers' hy_v4 conversion mapping, reversed: Tencent's published names) beside
# the names transformers' modules have (save_original_format=False): the plans name the latter where moelink's blocks
# already do (the MLA gate is MLAAttention's g_proj), and each alias says where a published file holds it.
_HC = tuple((f"{mine}.{p}", f"hc_pre.{theirs}.hc_{p}") for mine, theirs in (("attn_hc", "hc_attn_layer"),
                                                                          ("ffn_hc", "hc_mlp_layer"))
            for p in ("fn", "base", "scale"))
# The gates' FP8 block scales (`weight_scale_inv`) follow their weights.
_GATES = tuple((f"{mine}.{t}", f"{theirs}.{t}") for t in ("weight", "weight_scale_inv")
               for mine, theirs in (("self_attn.g_proj", "self_attn.linear_gate"),
                                    ("self_attn.g_proj", "self_attn.gate_proj"),
                                    ("mlp.gate_proj", "mlp.linear_gate"),
                                    ("shared_experts.gate_proj", "shared_experts.linear_gate")))
ALIASES = (
    *_GATES,
    ("self_attn.sinks", "self_attn.learnable_sink_param"),
    *_HC,
    *((f"hc_head.hc_{p}", f"hc_pre.hc_head.hc_head_{p}") for p in ("fn", "base", "scale")),
)

# Speculative method "mtp" (engine/config/speculative.py names this reason): the release ships an MTP module, but the
# locked transformers shows only its prefix, so moelink builds none rather than guess its structure.
_MTP_REFUSED = ("its MTP module (model.mtp_layers.*) is not built by transformers 5.24 (HYV4ForCausalLM ignores "
                "model.mtp_layers.* and HYV4Config names no count), so how it meets the main model's hyper-connection "
                "streams (which state it conditions on, whether it keeps its own hc_pre / hc_head) is unknown; "
                "moelink does not guess it.")

ARCHITECTURES = (
    # Hy4 (reader.py): MLA + DSA with sinks and an element-wise output gate, independent hyper-connections (kinds.py's
    # residual "independent_hyper" and head "hc_head_rms"; DeepSeek-V4's "hc_streams" embedding), mlp_layer_types'
    # dense MLPs and routed experts (fused gate_up_proj as saved) with shared experts; the MTP layers
    # (model.mtp_layers.*, which transformers does not load either) are not read.
    Architecture("HYV4ForCausalLM",
                 ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ, residual="independent_hyper",
                          embedding="hc_streams", head="hc_head_rms", unread_prefixes=("model.mtp_layers.",),
                          weight_aliases=ALIASES),
                 model_type="hy_v4", mtp_refused=_MTP_REFUSED),
)
