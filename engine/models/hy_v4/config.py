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

ARCHITECTURES = (
    # Hy4 (reader.py): MLA + DSA with sinks and an element-wise output gate, independent hyper-connections (kinds.py's
    # residual "independent_hyper" and head "hc_head_rms"; DeepSeek-V4's "hc_streams" embedding), mlp_layer_types'
    # dense MLPs and routed experts (fused gate_up_proj as saved) with shared experts; its MTP module
    # (model.mtp_layers.0.*, which transformers does not load) is read by speculative method "mtp" only, in the layout
    # "hy_v4" (mtp.py: vLLM's and SGLang's structure); config.json's num_nextn_predict_layers, else one (vLLM's rule).
    Architecture("HYV4ForCausalLM",
                 ArchSpec("mla", moe_prefix="mlp", expert_names=PROJ, residual="independent_hyper",
                          embedding="hc_streams", head="hc_head_rms", weight_aliases=ALIASES),
                 model_type="hy_v4", mtp_layers=True, mtp_layout="hy_v4", mtp_unstated=1),
)
