"""gpt-oss's registry entry (engine/config/architectures.py gathers it). No torch."""
from __future__ import annotations

from ...config.arch_spec import PROJ, ArchSpec, Architecture

ARCHITECTURES = (
    # gpt-oss-20b / 120b: GQA with sinks and sliding windows, fused experts with biases, MXFP4 as published.
    Architecture("GptOssForCausalLM", ArchSpec("gqa", moe_prefix="mlp", expert_names=PROJ, router="router",
                                               expert_layout="gpt_oss"), model_type="gpt_oss", mxfp4_experts=True),
)
