"""DeepSeek-V4's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import ArchSpec, Architecture

ARCHITECTURES = (
    # DeepSeek-V4 (Flash, Pro; reader.py): MQA with sinks over a sliding window and compressed entries
    # (CSA / HCA), hyper-connections, hash-routed first MoE layers, sqrtsoftplus routing; its checkpoint names are
    # the published ones (attn.wq_a, ffn.experts.{e}.w1, hc_attn_fn, ...), which save_pretrained writes back. Its
    # block kinds are this package's (kinds.py).
    Architecture("DeepseekV4ForCausalLM", ArchSpec("compressed", moe_prefix="ffn", expert_names=("w1", "w3", "w2"),
                                                   correction_bias="gate.bias", residual="hyper", ffn="token_routed",
                                                   embedding="hc_streams", head="hc_head", checkpoint="published"),
                 model_type="deepseek_v4",
                 mtp_layers=True, mtp_layout="dsv4"),
)
